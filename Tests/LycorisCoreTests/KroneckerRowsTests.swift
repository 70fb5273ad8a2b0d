import LycorisCore
import Testing

/// `KroneckerRows` against the definition y[r, i·b + j] = Σ_{l,k} W1[i, l]·W2[j, k]·x[r, l·c + k]
/// (Y = X·kron(W1, W2)ᵀ) and its gradients, summed in Double: shapes with one row, one
/// element per factor, rows that leave a partial last block, enough rows for several
/// blocks split over the engine's threads, and one-row GEMMs past OpenBLAS's single-thread
/// limit (one worker).
@Suite struct KroneckerRowsTests {
    static let tolerance = 1e-5

    /// (rows, a, m, b, c): W1 (a, m), W2 (b, c), X (rows, m·c).
    static let shapes: [[Int]] = [
        [1, 1, 1, 1, 1],
        [5, 2, 3, 4, 1],
        [37, 4, 6, 5, 3],
        [3, 1, 7, 2, 5],
        [4000, 3, 5, 7, 4],
        [700, 16, 16, 20, 20],
        [3, 2, 70, 70, 60],
    ]

    /// Y, ∂X, ∂W1 and ∂W2 from the definition, in Double.
    static func reference(_ x: Tensor, _ gy: Tensor, _ w1: Tensor, _ w2: Tensor)
        -> (y: [Double], gx: [Double], gw1: [Double], gw2: [Double]) {
        let (rows, a, m, b, c) = (x.shape[0], w1.shape[0], w1.shape[1], w2.shape[0], w2.shape[1])
        var (y, gx) = ([Double](repeating: 0, count: rows * a * b), [Double](repeating: 0, count: rows * m * c))
        var (gw1, gw2) = ([Double](repeating: 0, count: a * m), [Double](repeating: 0, count: b * c))
        for r in 0..<rows {
            for i in 0..<a {
                for j in 0..<b {
                    let out = r * a * b + i * b + j
                    let g = Double(gy.scalars[out])
                    for l in 0..<m {
                        for k in 0..<c {
                            let (u, v) = (Double(w1.scalars[i * m + l]), Double(w2.scalars[j * c + k]))
                            let xv = Double(x.scalars[r * m * c + l * c + k])
                            y[out] += u * v * xv
                            gx[r * m * c + l * c + k] += g * u * v
                            gw1[i * m + l] += g * v * xv
                            gw2[j * c + k] += g * u * xv
                        }
                    }
                }
            }
        }
        return (y, gx, gw1, gw2)
    }

    @Test(arguments: shapes)
    func forwardAndBackwardMatchDefinition(shape: [Int]) {
        let (rows, a, m, b, c) = (shape[0], shape[1], shape[2], shape[3], shape[4])
        let seed = UInt64(shape.reduce(7) { $0 * 31 + $1 })
        let x = uniformTensor([rows, m * c], seed: seed)
        let gy = uniformTensor([rows, a * b], seed: seed + 1)
        let (w1, w2) = (uniformTensor([a, m], seed: seed + 2), uniformTensor([b, c], seed: seed + 3))
        let expected = Self.reference(x, gy, w1, w2)
        let y = KroneckerRows.forward(x, w1: w1, w2: w2)
        #expect(y.shape == [rows, a * b])
        #expect(relativeError(y.scalars, expected.y) < Self.tolerance)
        let back = KroneckerRows.backward(x, gradOutput: gy, w1: w1, w2: w2)
        #expect(back.input.shape == x.shape && back.w1.shape == [a, m] && back.w2.shape == [b, c])
        #expect(relativeError(back.input.scalars, expected.gx) < Self.tolerance)
        #expect(relativeError(back.w1.scalars, expected.gw1) < Self.tolerance)
        #expect(relativeError(back.w2.scalars, expected.gw2) < Self.tolerance)
    }

    @Test func noRowsGiveEmptyOutputAndZeroWeightGradients() {
        let (x, gy) = (Tensor.zeros([0, 6]), Tensor.zeros([0, 8]))
        let (w1, w2) = (uniformTensor([2, 3], seed: 1), uniformTensor([4, 2], seed: 2))
        #expect(KroneckerRows.forward(x, w1: w1, w2: w2).shape == [0, 8])
        let back = KroneckerRows.backward(x, gradOutput: gy, w1: w1, w2: w2)
        #expect(back.input.shape == [0, 6])
        #expect(back.w1.scalars == [Float](repeating: 0, count: 6) && back.w2.scalars == [Float](repeating: 0, count: 8))
    }
}
