import LycorisCore
import LycorisTestSupport
import Testing

/// sgesdd through the row-major wrapper, and the randomised range finder against it.
@Suite("singular value decomposition")
struct SingularValueDecompositionTests {
    /// A (m, n) matrix of rank `rank` with singular values 10, 9, … plus Gaussian noise.
    static func lowRankPlusNoise(_ m: Int, _ n: Int, rank: Int, noise: Float, seed: UInt64) -> Tensor {
        let left = randomTensor([m, rank], seed: seed), right = randomTensor([rank, n], seed: seed + 1)
        return Tensor.matmul(left, right, alpha: 1 / Float(rank)) + randomTensor([m, n], seed: seed + 2, std: noise)
    }

    @Test("U·diag(S)·Vt rebuilds the matrix, U and Vt are orthonormal, S descends", arguments: [(7, 4), (4, 7), (12, 12)])
    func exact(_ m: Int, _ n: Int) throws {
        let a = randomTensor([m, n], seed: UInt64(m * 31 + n))
        let svd = try a.singularValueDecomposition()
        let k = min(m, n)
        #expect(svd.u.shape == [m, k] && svd.s.count == k && svd.vt.shape == [k, n])
        let (up, down) = svd.factors(rank: k)
        expectClose(Tensor.matmul(up, down), a, tolerance: 1e-5, "reconstruction")
        expectClose(Tensor.matmul(svd.u, transposeA: true, svd.u), Self.identity(k), tolerance: 1e-5, "UᵀU")
        expectClose(Tensor.matmul(svd.vt, svd.vt, transposeB: true), Self.identity(k), tolerance: 1e-5, "V Vᵀ")
        #expect(zip(svd.s, svd.s.dropFirst()).allSatisfy { $0 >= $1 })
        // The largest singular value is the operator norm: ‖A·v1‖ = s1.
        let v1 = Tensor(shape: [n, 1], scalars: Array(svd.vt.scalars[0..<n]))
        #expect(abs(Tensor.matmul(a, v1).norm - svd.s[0]) < 1e-4 * svd.s[0])
    }

    @Test("the randomised rank-r factors reconstruct within 1% of the exact truncation's error")
    func randomized() throws {
        for (m, n, r) in [(96, 80, 2), (64, 200, 3), (150, 60, 1), (640, 400, 16)] {
            // Noise dominates the tail the rank cuts into: the hard case for a range finder.
            let a = Self.lowRankPlusNoise(m, n, rank: r / 2 + 1, noise: 0.05, seed: UInt64(m + n + r))
            let exact = try a.singularValueDecomposition().factors(rank: r)
            let fast = try a.randomizedSingularValueDecomposition(rank: r, seed: 3).factors(rank: r)
            let exactError = (a - Tensor.matmul(exact.up, exact.down)).norm
            let fastError = (a - Tensor.matmul(fast.up, fast.down)).norm
            #expect(fast.up.shape == [m, r] && fast.down.shape == [r, n])
            #expect(fastError >= exactError * (1 - 1e-5), "no rank-r factorisation beats the SVD's")
            #expect(fastError <= exactError * 1.01, "\(m)x\(n) r\(r): \(fastError) vs exact \(exactError)")
        }
    }

    static func identity(_ k: Int) -> Tensor {
        var eye = Tensor.zeros([k, k])
        for index in 0..<k { eye.scalars[index * k + index] = 1 }
        return eye
    }
}
