import LycorisCore
import Testing

/// `gemm` / `matmul` against the naive triple loop in Double.
@Suite struct MatrixMultiplyTests {
    /// Relative tolerance for Float32 products with k ≤ 64 (error ~ k·2⁻²⁴).
    static let tolerance = 1e-5

    struct Case: Sendable, CustomTestStringConvertible {
        var m, k, n: Int
        var transposeA, transposeB: Bool
        var testDescription: String { "m=\(m) k=\(k) n=\(n) \(transposeA ? "Aᵀ" : "A")·\(transposeB ? "Bᵀ" : "B")" }

        /// Stored shapes: A is (k, m) when transposed, B is (n, k) when transposed.
        var shapeA: [Int] { transposeA ? [k, m] : [m, k] }
        var shapeB: [Int] { transposeB ? [n, k] : [k, n] }
    }

    static let cases: [Case] = {
        let shapes = [(5, 7, 3), (3, 7, 5), (1, 1, 1), (4, 4, 4), (1, 9, 6), (6, 1, 2), (17, 33, 9), (2, 64, 31)]
        var result: [Case] = []
        for (m, k, n) in shapes {
            for transposeA in [false, true] {
                for transposeB in [false, true] {
                    result.append(Case(m: m, k: k, n: n, transposeA: transposeA, transposeB: transposeB))
                }
            }
        }
        return result
    }()

    @Test(arguments: cases)
    func gemmAccumulatesWithAlphaAndBeta(_ c: Case) {
        let seed = UInt64(c.m * 10_000 + c.k * 100 + c.n) * 4 + (c.transposeA ? 2 : 0) + (c.transposeB ? 1 : 0)
        let a = uniformTensor(c.shapeA, seed: seed)
        let b = uniformTensor(c.shapeB, seed: seed &+ 1_000_003)
        let initial = uniformTensor([c.m, c.n], seed: seed &+ 2_000_003)
        for (alpha, beta) in [(1.0, 0.0), (0.75, 1.0), (-1.5, 0.5), (2.0, -3.0)] as [(Float, Float)] {
            var out = initial
            Tensor.gemm(a, transposeA: c.transposeA, b, transposeB: c.transposeB,
                        alpha: alpha, beta: beta, into: &out)
            let expected = NaiveMatrix.gemm(a, transposeA: c.transposeA, b, transposeB: c.transposeB,
                                            alpha: Double(alpha), beta: Double(beta), c: initial)
            #expect(out.shape == [c.m, c.n])
            let error = relativeError(out.scalars, expected)
            #expect(error <= Self.tolerance, "α=\(alpha) β=\(beta): relative error \(error)")
        }
    }

    @Test(arguments: cases)
    func matmulMatchesNaive(_ c: Case) {
        let seed = UInt64(c.m * 10_000 + c.k * 100 + c.n) * 4 + (c.transposeA ? 2 : 0) + (c.transposeB ? 1 : 0) + 77
        let a = uniformTensor(c.shapeA, seed: seed)
        let b = uniformTensor(c.shapeB, seed: seed &+ 1_000_003)
        for alpha in [1, -0.5] as [Float] {
            let product = Tensor.matmul(a, transposeA: c.transposeA, b, transposeB: c.transposeB, alpha: alpha)
            #expect(product.shape == [c.m, c.n])
            let expected = NaiveMatrix.gemm(a, transposeA: c.transposeA, b, transposeB: c.transposeB,
                                            alpha: Double(alpha), beta: 0, c: .zeros([c.m, c.n]))
            let error = relativeError(product.scalars, expected)
            #expect(error <= Self.tolerance, "α=\(alpha): relative error \(error)")
        }
    }

    @Test func matmulKnownValues() {
        let a = Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
        let b = Tensor(shape: [3, 2], scalars: [7, 8, 9, 10, 11, 12])
        #expect(Tensor.matmul(a, b) == Tensor(shape: [2, 2], scalars: [58, 64, 139, 154]))
        #expect(Tensor.matmul(a, transposeA: true, a) ==
                Tensor(shape: [3, 3], scalars: [17, 22, 27, 22, 29, 36, 27, 36, 45]))
        #expect(Tensor.matmul(a, a, transposeB: true) == Tensor(shape: [2, 2], scalars: [14, 32, 32, 77]))
        #expect(Tensor.matmul(b, transposeA: true, a, transposeB: true) ==
                Tensor(shape: [2, 2], scalars: [58, 139, 64, 154]))
    }

    /// (A·B)ᵀ = Bᵀ·Aᵀ, computed through the transpose flags.
    @Test func transposeOfProductIdentity() {
        let a = uniformTensor([5, 7], seed: 201)
        let b = uniformTensor([7, 3], seed: 202)
        let left = Tensor.matmul(a, b).transposed
        let right = Tensor.matmul(b, transposeA: true, a, transposeB: true)
        let error = relativeError(right.scalars, left.scalars.map(Double.init))
        #expect(error <= Self.tolerance)
    }

    /// With k = 0 the product is empty: C = β·C.
    @Test func emptyInnerDimensionScalesC() {
        let initial = uniformTensor([3, 4], seed: 211)
        var out = initial
        Tensor.gemm(.zeros([3, 0]), .zeros([0, 4]), alpha: 2, beta: 0.5, into: &out)
        #expect(out.scalars == initial.scalars.map { $0 * 0.5 })
        #expect(Tensor.matmul(.zeros([3, 0]), .zeros([0, 4])) == .zeros([3, 4]))
    }

    @Test func emptyOuterDimensions() {
        #expect(Tensor.matmul(.zeros([0, 3]), uniformTensor([3, 4], seed: 221)).shape == [0, 4])
        #expect(Tensor.matmul(uniformTensor([2, 3], seed: 222), .zeros([3, 0])).shape == [2, 0])
    }
}
