import LycorisCore
import Testing

/// `Tensor.kronecker` and `kroneckerBackward` against the index definition
/// `K[i·r + j, l·s + m, κ] = A[i, l] · B[j, m, κ]`.
@Suite struct KroneckerTests {
    static let tolerance = 1e-5

    /// (A shape, B shape): matrices, kernel axes, and degenerate extents.
    static let shapes: [([Int], [Int])] = [
        ([2, 3], [4, 5]),
        ([2, 3], [4, 5, 3, 3]),
        ([3, 2], [2, 4, 1, 3]),
        ([1, 4], [3, 1]),
        ([4, 1], [1, 3, 2]),
        ([1, 1], [2, 2]),
    ]

    /// The definition, element by element.
    private func naiveKronecker(_ a: Tensor, _ b: Tensor) -> (shape: [Int], values: [Double]) {
        let (p, q, r, s) = (a.shape[0], a.shape[1], b.shape[0], b.shape[1])
        let kernelShape = Array(b.shape[2...])
        let shape = [p * r, q * s] + kernelShape
        var values = [Double](repeating: .nan, count: shape.product)
        for i in 0..<p {
            for l in 0..<q {
                for j in 0..<r {
                    for m in 0..<s {
                        for kappa in RowMajor.all(kernelShape) {
                            let target = RowMajor.offset([i * r + j, l * s + m] + kappa, in: shape)
                            values[target] = Double(a[at: [i, l]]) * Double(b[at: [j, m] + kappa])
                        }
                    }
                }
            }
        }
        return (shape, values)
    }

    @Test(arguments: shapes)
    func kroneckerMatchesDefinition(shapeA: [Int], shapeB: [Int]) {
        let a = uniformTensor(shapeA, seed: UInt64(shapeA.product * 100 + shapeB.product))
        let b = uniformTensor(shapeB, seed: UInt64(shapeA.product * 100 + shapeB.product) + 1)
        let k = Tensor.kronecker(a, b)
        let expected = naiveKronecker(a, b)
        #expect(k.shape == expected.shape)
        guard k.shape == expected.shape else { return }
        // Each element is one Float product: exact up to the final rounding.
        #expect(k.scalars == expected.values.map { Float($0) })
    }

    @Test func kroneckerKnownValues() {
        let a = Tensor(shape: [2, 2], scalars: [1, 2, 3, 4])
        let b = Tensor(shape: [2, 2], scalars: [0, 5, 6, 7])
        #expect(Tensor.kronecker(a, b) == Tensor(shape: [4, 4], scalars: [
            0, 5, 0, 10,
            6, 7, 12, 14,
            0, 15, 0, 20,
            18, 21, 24, 28,
        ]))
        // The identity ⊗ B is block-diagonal.
        let eye = Tensor(shape: [2, 2], scalars: [1, 0, 0, 1])
        let blocks = Tensor.kronecker(eye, Tensor(shape: [1, 2], scalars: [3, 4]))
        #expect(blocks == Tensor(shape: [2, 4], scalars: [3, 4, 0, 0, 0, 0, 3, 4]))
    }

    /// Mixed-product property: (A ⊗ B)(C ⊗ D) = (AC) ⊗ (BD).
    @Test func mixedProductProperty() {
        let a = uniformTensor([2, 3], seed: 401), c = uniformTensor([3, 4], seed: 402)
        let b = uniformTensor([4, 5], seed: 403), d = uniformTensor([5, 2], seed: 404)
        let left = Tensor.matmul(Tensor.kronecker(a, b), Tensor.kronecker(c, d))
        let right = Tensor.kronecker(Tensor.matmul(a, c), Tensor.matmul(b, d))
        #expect(left.shape == [8, 8] && right.shape == [8, 8])
        #expect(relativeError(left.scalars, right.scalars.map(Double.init)) <= Self.tolerance)
    }

    /// Kernel axes: each kernel tap κ of kron(A, B) is kron(A, B[:, :, κ]).
    @Test func kernelAxesAreIndependentSlices() {
        let a = uniformTensor([2, 3], seed: 411)
        let b = uniformTensor([4, 5, 3, 3], seed: 412)
        let k = Tensor.kronecker(a, b)
        for kappa in RowMajor.all([3, 3]) {
            var slice = [Float]()
            for j in 0..<4 { for m in 0..<5 { slice.append(b[at: [j, m] + kappa]) } }
            let perTap = Tensor.kronecker(a, Tensor(shape: [4, 5], scalars: slice))
            for row in 0..<8 {
                for column in 0..<15 { #expect(k[at: [row, column] + kappa] == perTap[at: [row, column]]) }
            }
        }
    }

    @Test(arguments: shapes)
    func backwardMatchesDefinition(shapeA: [Int], shapeB: [Int]) {
        let seed = UInt64(shapeA.product * 1000 + shapeB.product * 7)
        let a = uniformTensor(shapeA, seed: seed)
        let b = uniformTensor(shapeB, seed: seed + 1)
        let (p, q, r, s) = (shapeA[0], shapeA[1], shapeB[0], shapeB[1])
        let kernelShape = Array(shapeB[2...])
        let gradientShape = [p * r, q * s] + kernelShape
        let g = uniformTensor(gradientShape, seed: seed + 2)

        // ∂A[i,l] = Σ_{j,m,κ} G[i·r+j, l·s+m, κ]·B[j,m,κ]; ∂B[j,m,κ] = Σ_{i,l} G[i·r+j, l·s+m, κ]·A[i,l].
        var expectedA = [Double](repeating: 0, count: p * q)
        var expectedB = [Double](repeating: 0, count: shapeB.product)
        for i in 0..<p {
            for l in 0..<q {
                for j in 0..<r {
                    for m in 0..<s {
                        for kappa in RowMajor.all(kernelShape) {
                            let gv = Double(g[at: [i * r + j, l * s + m] + kappa])
                            expectedA[i * q + l] += gv * Double(b[at: [j, m] + kappa])
                            expectedB[RowMajor.offset([j, m] + kappa, in: shapeB)] += gv * Double(a[at: [i, l]])
                        }
                    }
                }
            }
        }

        let (gradA, gradB) = Tensor.kroneckerBackward(g, a, b)
        #expect(gradA.shape == shapeA)
        #expect(gradB.shape == shapeB)
        #expect(relativeError(gradA.scalars, expectedA) <= Self.tolerance, "∂A")
        #expect(relativeError(gradB.scalars, expectedB) <= Self.tolerance, "∂B")
    }

    /// ⟨kron(A, B), G⟩ = ⟨A, ∂A⟩ = ⟨B, ∂B⟩ (the product is bilinear).
    @Test(arguments: shapes)
    func backwardAdjointIdentity(shapeA: [Int], shapeB: [Int]) {
        let seed = UInt64(shapeA.product * 31 + shapeB.product * 1009)
        let a = uniformTensor(shapeA, seed: seed)
        let b = uniformTensor(shapeB, seed: seed + 1)
        let k = Tensor.kronecker(a, b)
        let g = uniformTensor(k.shape, seed: seed + 2)
        let (gradA, gradB) = Tensor.kroneckerBackward(g, a, b)
        let viaProduct = naiveDot(k.scalars, g.scalars)
        let viaA = naiveDot(a.scalars, gradA.scalars)
        let viaB = naiveDot(b.scalars, gradB.scalars)
        let scale = naiveNorm(k.scalars) * naiveNorm(g.scalars)
        #expect(scale > 0)
        #expect(abs(viaProduct - viaA) <= Self.tolerance * scale, "⟨K,G⟩ \(viaProduct) vs ⟨A,∂A⟩ \(viaA)")
        #expect(abs(viaProduct - viaB) <= Self.tolerance * scale, "⟨K,G⟩ \(viaProduct) vs ⟨B,∂B⟩ \(viaB)")
    }
}
