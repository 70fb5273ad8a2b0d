import LycorisCore
import Testing

/// Elementwise operators and reductions. Elementwise inputs are small integers so every
/// expected value is exact in Float and compared with `==`.
@Suite struct TensorArithmeticTests {
    static let shape = [3, 4, 5]
    static let a = integerTensor(shape, seed: 101)
    static let b = integerTensor(shape, seed: 102)

    /// Applies `op` per element by hand.
    private func elementwise(_ op: (Float, Float) -> Float) -> [Float] {
        (0..<Self.a.count).map { op(Self.a.scalars[$0], Self.b.scalars[$0]) }
    }

    @Test func inputsAreNotTrivial() {
        #expect(Self.a != Self.b)
        #expect(Self.a.maxAbs > 0 && Self.b.maxAbs > 0)
    }

    @Test func addition() {
        let sum = Self.a + Self.b
        #expect(sum.shape == Self.shape)
        #expect(sum.scalars == elementwise(+))
        #expect(Tensor(shape: [3], scalars: [1, -2, 3]) + Tensor(shape: [3], scalars: [10, 20, -30])
            == Tensor(shape: [3], scalars: [11, 18, -27]))
    }

    @Test func subtraction() {
        let difference = Self.a - Self.b
        #expect(difference.shape == Self.shape)
        #expect(difference.scalars == elementwise(-))
        #expect((Self.a - Self.a).maxAbs == 0)
    }

    @Test func hadamardProduct() {
        let product = Self.a * Self.b
        #expect(product.shape == Self.shape)
        #expect(product.scalars == elementwise(*))
        #expect(Tensor(shape: [2, 2], scalars: [1, 2, 3, 4]) * Tensor(shape: [2, 2], scalars: [-1, 0, 2, 0.5])
            == Tensor(shape: [2, 2], scalars: [-1, 0, 6, 2]))
    }

    @Test func scalarProductOnBothSides() {
        let left = Self.a * Float(-1.5)
        let right = Float(-1.5) * Self.a
        let expected = Self.a.scalars.map { $0 * -1.5 }
        #expect(left.shape == Self.shape && right.shape == Self.shape)
        #expect(left.scalars == expected)
        #expect(right.scalars == expected)
    }

    @Test(arguments: [1, -2.5, 0] as [Float])
    func addScaledInPlace(alpha: Float) {
        var accumulator = Self.a
        accumulator.add(Self.b, scaledBy: alpha)
        #expect(accumulator.shape == Self.shape)
        #expect(accumulator.scalars == (0..<Self.a.count).map { Self.a.scalars[$0] + alpha * Self.b.scalars[$0] })
    }

    @Test func addDefaultsToUnitScale() {
        var accumulator = Self.a
        accumulator.add(Self.b)
        #expect(accumulator == Self.a + Self.b)
    }

    @Test func addDoesNotWriteThroughACopy() {
        let original = Self.a
        var copy = original
        copy.add(Self.b, scaledBy: 2)
        #expect(original == Self.a)
        #expect(copy != original)
    }

    @Test func mapAndZipMap() {
        #expect(Self.a.map { $0 * $0 + 1 }.scalars == Self.a.scalars.map { $0 * $0 + 1 })
        #expect(Self.a.zipMap(Self.b) { max($0, $1) }.scalars == elementwise { max($0, $1) })
        #expect(Self.a.map { $0 }.shape == Self.shape)
    }

    // MARK: Reductions on known values

    @Test func sumKnownValues() {
        #expect(Tensor(shape: [100], scalars: (1...100).map(Float.init)).sum == 5050)
        #expect(Tensor.zeros([0]).sum == 0)
        #expect(Tensor(shape: [2, 2], scalars: [1.5, -2.5, 4, -0.25]).sum == 2.75)
        // Accumulated in Double: a Float accumulator would lose the 1.
        #expect(Tensor(shape: [3], scalars: [1e8, 1, -1e8]).sum == 1)
    }

    @Test func sumMatchesNaive() {
        let t = uniformTensor([7, 11], seed: 111)
        let expected = t.scalars.reduce(0.0) { $0 + Double($1) }
        #expect(t.sum == Float(expected))
    }

    @Test func dotKnownValues() {
        let u = Tensor(shape: [3], scalars: [1, 2, 3])
        let v = Tensor(shape: [3], scalars: [4, 5, 6])
        #expect(u.dot(v) == 32)
        #expect(u.dot(u) == 14)
        // Shapes need not agree, only counts.
        #expect(Tensor(shape: [2, 2], scalars: [1, 2, 3, 4]).dot(Tensor(shape: [4], scalars: [1, 0, -1, 0.5])) == 0)
        // Accumulated in Double: a Float accumulator would lose the 1.
        #expect(Tensor(shape: [3], scalars: [1e8, 1, -1e8]).dot(Tensor(shape: [3], scalars: [1, 1, 1])) == 1)
    }

    @Test func dotMatchesNaive() {
        let x = uniformTensor([5, 9], seed: 121)
        let y = uniformTensor([5, 9], seed: 122)
        #expect(x.dot(y) == Float(naiveDot(x.scalars, y.scalars)))
    }

    @Test func normKnownValues() {
        #expect(Tensor(shape: [2], scalars: [3, 4]).norm == 5)
        #expect(Tensor(shape: [2, 2], scalars: [1, -1, 1, -1]).norm == 2)
        #expect(Tensor.zeros([3]).norm == 0)
        // 1e20² = 1e40 overflows Float; accumulated in Double the norm is √2·1e20.
        let big = Tensor(shape: [2], scalars: [1e20, -1e20]).norm
        #expect(big.isFinite)
        #expect(abs(Double(big) - 2.0.squareRoot() * 1e20) <= 1e-6 * 1.5e20)
    }

    @Test func normMatchesNaive() {
        let t = uniformTensor([4, 4, 4], seed: 131)
        #expect(t.norm == Float(naiveNorm(t.scalars)))
    }

    @Test func maxAbsKnownValues() {
        #expect(Tensor(shape: [3], scalars: [-7, 3, 5]).maxAbs == 7)
        #expect(Tensor(shape: [3], scalars: [-1, 6.5, 5]).maxAbs == 6.5)
        #expect(Tensor.zeros([0]).maxAbs == 0)
        #expect(Tensor(scalar: -0.25).maxAbs == 0.25)
    }

    @Test func isFinite() {
        #expect(Tensor(shape: [2], scalars: [1, -1e30]).isFinite)
        #expect(!Tensor(shape: [2], scalars: [1, .nan]).isFinite)
        #expect(!Tensor(shape: [2], scalars: [.infinity, 0]).isFinite)
        #expect(!Tensor(shape: [1], scalars: [-.infinity]).isFinite)
    }
}
