import LycorisCore
import Testing

/// Construction, reshape, strides, permutation, transposition, concatenation and slicing.
@Suite struct TensorLayoutTests {
    // MARK: Construction

    @Test func constructorsFillShapeAndScalars() {
        let zeros = Tensor.zeros([2, 3])
        #expect(zeros.shape == [2, 3])
        #expect(zeros.scalars == [Float](repeating: 0, count: 6))
        #expect(zeros.count == 6 && zeros.rank == 2)

        let sevens = Tensor(repeating: 7, shape: [4, 1, 2])
        #expect(sevens.scalars == [Float](repeating: 7, count: 8))

        let scalar = Tensor(scalar: -2.5)
        #expect(scalar.shape == [] && scalar.rank == 0 && scalar.count == 1)
        #expect(scalar.scalarValue == -2.5)
        #expect(Tensor(shape: [1, 1, 1], scalars: [9]).scalarValue == 9)

        let empty = Tensor.zeros([3, 0, 2])
        #expect(empty.count == 0 && empty.scalars.isEmpty)
    }

    @Test func equalityComparesShapeAndScalars() {
        let a = Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
        #expect(a == Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6]))
        #expect(a != Tensor(shape: [3, 2], scalars: [1, 2, 3, 4, 5, 6]))
        #expect(a != Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 7]))
    }

    @Test func shapeProduct() {
        #expect([Int]().product == 1)
        #expect([7].product == 7)
        #expect([2, 3, 4].product == 24)
        #expect([5, 0, 3].product == 0)
    }

    @Test(arguments: [
        ([2, 3, 4], [12, 4, 1]),
        ([5], [1]),
        ([], []),
        ([3, 1, 2, 5], [10, 10, 5, 1]),
        ([2, 0, 3], [0, 3, 1]),
    ] as [([Int], [Int])])
    func rowMajorStrides(shape: [Int], expected: [Int]) {
        #expect(Tensor.strides(of: shape) == expected)
    }

    @Test func stridesAgreeWithFlatOffsets() {
        let shape = [3, 4, 2, 5]
        let strides = Tensor.strides(of: shape)
        for index in RowMajor.all(shape) {
            let viaStrides = zip(index, strides).reduce(0) { $0 + $1.0 * $1.1 }
            #expect(viaStrides == RowMajor.offset(index, in: shape))
        }
    }

    // MARK: Reshape

    @Test(arguments: [
        ([-1, 4], [6, 4]),
        ([6, -1], [6, 4]),
        ([2, -1, 2], [2, 6, 2]),
        ([-1], [24]),
        ([1, -1, 1], [1, 24, 1]),
        ([4, 3, 2], [4, 3, 2]),
    ] as [([Int], [Int])])
    func reshapedInfersTheHole(request: [Int], expected: [Int]) {
        let source = iotaTensor([2, 3, 4])
        let reshaped = source.reshaped(request)
        #expect(reshaped.shape == expected)
        #expect(reshaped.scalars == source.scalars)
    }

    @Test func reshapedOfEmptyTensor() {
        let reshaped = Tensor.zeros([0, 5]).reshaped([-1, 5])
        #expect(reshaped.shape == [0, 5])
        #expect(reshaped.count == 0)
    }

    @Test(arguments: [
        (1, [2, 12]),
        (2, [6, 4]),
        (3, [24, 1]),
        (0, [1, 24]),
    ] as [(Int, [Int])])
    func flattenedToMatrix(rowAxes: Int, expected: [Int]) {
        let source = iotaTensor([2, 3, 4])
        let matrix = source.flattenedToMatrix(rowAxes: rowAxes)
        #expect(matrix.shape == expected)
        #expect(matrix.scalars == source.scalars)
    }

    /// "The first `rowAxes` axes become rows, the rest columns": a batch of zero rows
    /// still has its column count.
    @Test func flattenedToMatrixKeepsColumnsOfEmptyBatch() {
        #expect(Tensor.zeros([0, 5]).flattenedToMatrix().shape == [0, 5])
        #expect(Tensor.zeros([0, 3, 4]).flattenedToMatrix().shape == [0, 12])
    }

    // MARK: Permutation

    static let permutations3: [[Int]] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]

    /// All 24 permutations of four axes.
    static let permutations4: [[Int]] = {
        var result: [[Int]] = []
        func extend(_ prefix: [Int]) {
            if prefix.count == 4 { result.append(prefix); return }
            for axis in 0..<4 where !prefix.contains(axis) { extend(prefix + [axis]) }
        }
        extend([])
        return result
    }()

    /// `result[r] == source[s]` with `s[axes[k]] = r[k]`, by from-scratch offsets.
    private func expectPermutation(_ source: Tensor, _ axes: [Int], sourceLocation: SourceLocation = #_sourceLocation) {
        let result = source.permuted(axes)
        let expectedShape = axes.map { source.shape[$0] }
        #expect(result.shape == expectedShape, sourceLocation: sourceLocation)
        guard result.shape == expectedShape else { return }
        var mismatches = 0
        for r in RowMajor.all(expectedShape) {
            var s = [Int](repeating: 0, count: axes.count)
            for k in axes.indices { s[axes[k]] = r[k] }
            if result[at: r] != source[at: s] { mismatches += 1 }
        }
        #expect(mismatches == 0, "permuted(\(axes)) of \(source.shape): \(mismatches) wrong elements", sourceLocation: sourceLocation)
    }

    @Test(arguments: permutations3)
    func permuted3D(axes: [Int]) {
        expectPermutation(uniformTensor([2, 3, 4], seed: 11), axes)
        expectPermutation(uniformTensor([5, 1, 3], seed: 12), axes)
    }

    @Test(arguments: permutations4)
    func permuted4D(axes: [Int]) {
        expectPermutation(uniformTensor([2, 3, 4, 5], seed: 21), axes)
        expectPermutation(uniformTensor([3, 1, 2, 1], seed: 22), axes)
    }

    @Test func permuted5DAndRank1() {
        expectPermutation(uniformTensor([2, 3, 1, 4, 2], seed: 31), [4, 2, 0, 3, 1])
        expectPermutation(uniformTensor([2, 3, 1, 4, 2], seed: 32), [1, 3, 4, 0, 2])
        expectPermutation(uniformTensor([7], seed: 33), [0])
    }

    @Test func permutedWithEmptyAxis() {
        let result = Tensor.zeros([2, 0, 3]).permuted([2, 0, 1])
        #expect(result.shape == [3, 2, 0])
        #expect(result.count == 0)
    }

    @Test(arguments: permutations4)
    func permutedThenInverseIsIdentity(axes: [Int]) {
        let source = uniformTensor([2, 3, 4, 5], seed: 41)
        var inverse = [Int](repeating: 0, count: axes.count)
        for k in axes.indices { inverse[axes[k]] = k }
        #expect(source.permuted(axes).permuted(inverse) == source)
    }

    @Test func transposed() {
        let a = uniformTensor([3, 5], seed: 51)
        let t = a.transposed
        #expect(t.shape == [5, 3])
        for i in 0..<3 {
            for j in 0..<5 { #expect(t[at: [j, i]] == a[at: [i, j]]) }
        }
        #expect(t.transposed == a)
        // Known values.
        let m = Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
        #expect(m.transposed == Tensor(shape: [3, 2], scalars: [1, 4, 2, 5, 3, 6]))
    }

    // MARK: Concatenation and slicing

    static let source3D = uniformTensor([4, 5, 6], seed: 61)

    /// Uneven pieces that tile each axis of `source3D` (including an empty piece).
    static let piecesByAxis: [Int: [Range<Int>]] = [
        0: [0..<1, 1..<1, 1..<4],
        1: [0..<2, 2..<3, 3..<5],
        2: [0..<3, 3..<4, 4..<6, 6..<6],
    ]

    @Test(arguments: [0, 1, 2])
    func sliceMatchesNaiveIndexing(axis: Int) throws {
        let source = Self.source3D
        for range in try #require(Self.piecesByAxis[axis]) + [0..<source.shape[axis]] {
            let slice = source.slice(axis: axis, range)
            var expectedShape = source.shape
            expectedShape[axis] = range.count
            #expect(slice.shape == expectedShape)
            guard slice.shape == expectedShape else { continue }
            for index in RowMajor.all(expectedShape) {
                var sourceIndex = index
                sourceIndex[axis] += range.lowerBound
                #expect(slice[at: index] == source[at: sourceIndex])
            }
        }
    }

    @Test(arguments: [0, 1, 2])
    func concatenatingSlicesRestoresTheOriginal(axis: Int) throws {
        let source = Self.source3D
        let pieces = try #require(Self.piecesByAxis[axis]).map { source.slice(axis: axis, $0) }
        #expect(Tensor.concatenate(pieces, axis: axis) == source)
        #expect(Tensor.concatenate([source], axis: axis) == source)
    }

    @Test(arguments: [0, 1, 2])
    func concatenateMatchesNaiveIndexing(axis: Int) {
        var shapeA = [2, 3, 4], shapeB = [2, 3, 4], shapeC = [2, 3, 4]
        shapeA[axis] = 2; shapeB[axis] = 1; shapeC[axis] = 3
        let a = uniformTensor(shapeA, seed: 71), b = uniformTensor(shapeB, seed: 72), c = uniformTensor(shapeC, seed: 73)
        let joined = Tensor.concatenate([a, b, c], axis: axis)
        var expectedShape = shapeA
        expectedShape[axis] = 6
        #expect(joined.shape == expectedShape)
        guard joined.shape == expectedShape else { return }
        for index in RowMajor.all(expectedShape) {
            var local = index
            let expected: Float
            switch index[axis] {
            case 0..<2: expected = a[at: local]
            case 2..<3: local[axis] -= 2; expected = b[at: local]
            default: local[axis] -= 3; expected = c[at: local]
            }
            #expect(joined[at: index] == expected)
        }
    }

    @Test func concatenateKnownValues() {
        let a = Tensor(shape: [2, 2], scalars: [1, 2, 3, 4])
        let b = Tensor(shape: [2, 1], scalars: [5, 6])
        #expect(Tensor.concatenate([a, b], axis: 1) == Tensor(shape: [2, 3], scalars: [1, 2, 5, 3, 4, 6]))
        #expect(Tensor.concatenate([a, b.transposed], axis: 0) == Tensor(shape: [3, 2], scalars: [1, 2, 3, 4, 5, 6]))
    }
}
