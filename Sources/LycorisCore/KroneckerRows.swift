/// Rows multiplied by a Kronecker product without building it (LoKr's linear factor path):
/// each row x (m·c) of X (rows, m·c), viewed as the matrix Xᵣ (m, c), maps to
/// yᵣ = vec(W1·Xᵣ·W2ᵀ) (a·b) — that is, Y = X·kron(W1, W2)ᵀ — for W1 (a, m), W2 (b, c).
///
/// The work runs over blocks of B consecutive rows, each block's intermediates staying in
/// the core's cache, so the activations cross memory once each way (the forward reads X
/// and writes Y; the backward reads X and ∂Y and writes ∂X). Per block (Z = Xᵣ·W2ᵀ, stacked):
/// - Z (B·m, b) = X_B (B·m, c)·W2ᵀ, then Zᵗ (m, B·b) its rows regrouped by m;
/// - forward: V (a, B·b) = W1·Zᵗ, regrouped by row into Y_B (B, a·b);
/// - backward, with ∂Vᵗ (a, B·b) from ∂Y_B: ∂W1 += ∂Vᵗ·Zᵗᵀ, ∂Zᵗ = W1ᵀ·∂Vᵗ regrouped into
///   ∂Z (B·m, b), ∂W2 += ∂Zᵀ·X_B, ∂X_B = ∂Z·W2.
/// Blocks are split over the engine's threads (``ParallelRanges``), each worker running
/// OpenBLAS on blocks small enough that OpenBLAS keeps them on the calling thread; the
/// weight gradients are per-worker partial sums added in worker order (deterministic for a
/// given thread count).
public enum KroneckerRows {
    /// The shapes of one problem: X (rows, m·c), W1 (a, m), W2 (b, c).
    struct Problem {
        let rows: Int, a: Int, m: Int, b: Int, c: Int
        /// Rows per block: the largest B whose GEMMs stay under OpenBLAS's single-thread
        /// limit (m·n·k ≤ 2¹⁸, from its `GEMM_MULTITHREAD_THRESHOLD` default), at least 1.
        let blockRows: Int

        init(_ x: Tensor, _ w1: Tensor, _ w2: Tensor) {
            precondition(w1.rank == 2 && w2.rank == 2 && x.rank == 2,
                         "KroneckerRows needs X, W1, W2 matrices: \(x.shape) \(w1.shape) \(w2.shape)")
            (a, m, b, c) = (w1.shape[0], w1.shape[1], w2.shape[0], w2.shape[1])
            precondition(x.shape[1] == m * c, "KroneckerRows: row width \(x.shape[1]) is not \(m)·\(c)")
            rows = x.shape[0]
            perRow = Swift.max(m * b * c, a * m * b, 1)
            blockRows = Swift.max(1, Swift.min(rows, Self.singleThreadLimit / perRow))
        }

        /// The largest GEMM's m·n·k per block row: Z (m·b·c) or W1·Zᵗ (a·m·b).
        private let perRow: Int
        /// OpenBLAS runs a GEMM on the calling thread up to this m·n·k.
        static let singleThreadLimit = 1 << 18

        var blocks: Int { (rows + blockRows - 1) / blockRows }
        func rowRange(_ block: Int) -> Range<Int> { block * blockRows..<Swift.min(rows, (block + 1) * blockRows) }
        /// One worker when even a one-row block's GEMMs exceed the single-thread limit:
        /// OpenBLAS threads those itself.
        var workers: Int {
            perRow > Self.singleThreadLimit ? 1 : ParallelRanges.workers(count: blocks, workPerItem: blockRows * (m * c + a * b))
        }
        /// Floats of one block's scratch matrix: the larger of (B, m·b) and (B, a·b).
        var scratchCount: Int { blockRows * b * Swift.max(m, a) }
    }

    /// Y (rows, a·b) = X·kron(W1, W2)ᵀ for X (rows, m·c), W1 (a, m), W2 (b, c).
    public static func forward(_ x: Tensor, w1: Tensor, w2: Tensor) -> Tensor {
        let p = Problem(x, w1, w2)
        var y = Tensor(uninitializedShape: [p.rows, p.a * p.b])
        guard p.rows > 0 else { return y }
        x.scalars.withUnsafeBufferPointer { px in
            w1.scalars.withUnsafeBufferPointer { pw1 in
                w2.scalars.withUnsafeBufferPointer { pw2 in
                    y.scalars.withUnsafeMutableBufferPointer { py in
                        let (x, w1, w2, y) = (px.baseAddress!, pw1.baseAddress!, pw2.baseAddress!, py.baseAddress!)
                        ParallelRanges.run(count: p.blocks, workers: p.workers) { blocks, _ in
                            Scratch.with(p) { scratch in
                                for block in blocks {
                                    let range = p.rowRange(block)
                                    let n = range.count
                                    scratch.regroupedZ(x + range.lowerBound * p.m * p.c, rows: n, w2: w2, p)
                                    // V (a, n·b) = W1·Zᵗ into the first scratch, then regrouped into Y's rows.
                                    BLAS.sgemm(transposeA: false, transposeB: false, m: p.a, n: n * p.b, k: p.m, alpha: 1,
                                               a: w1, lda: p.m, b: scratch.second, ldb: n * p.b,
                                               beta: 0, c: scratch.first, ldc: n * p.b)
                                    swapLeadingAxes(scratch.first, into: y + range.lowerBound * p.a * p.b,
                                                    outer: p.a, inner: n, block: p.b)
                                }
                            }
                        }
                    }
                }
            }
        }
        return y
    }

    /// ∂X (rows, m·c), ∂W1 (a, m), ∂W2 (b, c) of Y = X·kron(W1, W2)ᵀ from ∂Y (rows, a·b).
    public static func backward(_ x: Tensor, gradOutput: Tensor, w1: Tensor, w2: Tensor) -> (input: Tensor, w1: Tensor, w2: Tensor) {
        let p = Problem(x, w1, w2)
        precondition(gradOutput.shape == [p.rows, p.a * p.b], "KroneckerRows: ∂Y \(gradOutput.shape) is not [\(p.rows), \(p.a * p.b)]")
        let workers = p.workers
        var gradInput = Tensor(uninitializedShape: x.shape)
        guard p.rows > 0 else { return (gradInput, .zeros([p.a, p.m]), .zeros([p.b, p.c])) }
        // Per-worker partial sums: ∂W1 (a·m) then ∂W2 (b·c) for each worker.
        let partialCount = p.a * p.m + p.b * p.c
        var partials = [Float](repeating: 0, count: workers * partialCount)
        x.scalars.withUnsafeBufferPointer { px in
            gradOutput.scalars.withUnsafeBufferPointer { pgy in
                w1.scalars.withUnsafeBufferPointer { pw1 in
                    w2.scalars.withUnsafeBufferPointer { pw2 in
                        gradInput.scalars.withUnsafeMutableBufferPointer { pgx in
                            partials.withUnsafeMutableBufferPointer { ppart in
                                let (x, gy, w1, w2) = (px.baseAddress!, pgy.baseAddress!, pw1.baseAddress!, pw2.baseAddress!)
                                let (gx, part) = (pgx.baseAddress!, ppart.baseAddress!)
                                ParallelRanges.run(count: p.blocks, workers: workers) { blocks, worker in
                                    let gw1 = part + worker * partialCount
                                    let gw2 = gw1 + p.a * p.m
                                    Scratch.with(p) { scratch in
                                        for block in blocks {
                                            let range = p.rowRange(block)
                                            let n = range.count
                                            let xBlock = x + range.lowerBound * p.m * p.c
                                            // ∂Vᵗ (a, n·b) from ∂Y's rows, in the third scratch.
                                            swapLeadingAxes(gy + range.lowerBound * p.a * p.b, into: scratch.third,
                                                            outer: n, inner: p.a, block: p.b)
                                            scratch.regroupedZ(xBlock, rows: n, w2: w2, p)
                                            BLAS.sgemm(transposeA: false, transposeB: true, m: p.a, n: p.m, k: n * p.b, alpha: 1,
                                                       a: scratch.third, lda: n * p.b, b: scratch.second, ldb: n * p.b,
                                                       beta: 1, c: gw1, ldc: p.m)
                                            // ∂Zᵗ (m, n·b) = W1ᵀ·∂Vᵗ, regrouped into ∂Z (n·m, b).
                                            BLAS.sgemm(transposeA: true, transposeB: false, m: p.m, n: n * p.b, k: p.a, alpha: 1,
                                                       a: w1, lda: p.m, b: scratch.third, ldb: n * p.b,
                                                       beta: 0, c: scratch.second, ldc: n * p.b)
                                            swapLeadingAxes(scratch.second, into: scratch.first, outer: p.m, inner: n, block: p.b)
                                            BLAS.sgemm(transposeA: true, transposeB: false, m: p.b, n: p.c, k: n * p.m, alpha: 1,
                                                       a: scratch.first, lda: p.b, b: xBlock, ldb: p.c,
                                                       beta: 1, c: gw2, ldc: p.c)
                                            BLAS.sgemm(transposeA: false, transposeB: false, m: n * p.m, n: p.c, k: p.b, alpha: 1,
                                                       a: scratch.first, lda: p.b, b: w2, ldb: p.c,
                                                       beta: 0, c: gx + range.lowerBound * p.m * p.c, ldc: p.c)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        var gradW1 = Tensor.zeros([p.a, p.m]), gradW2 = Tensor.zeros([p.b, p.c])
        for worker in 0..<workers {
            let base = worker * partialCount
            for i in 0..<(p.a * p.m) { gradW1.scalars[i] += partials[base + i] }
            for i in 0..<(p.b * p.c) { gradW2.scalars[i] += partials[base + p.a * p.m + i] }
        }
        return (gradInput, gradW1, gradW2)
    }

    /// One worker's block scratch: three matrices of ``Problem/scratchCount`` floats.
    private struct Scratch {
        let first, second, third: UnsafeMutablePointer<Float>

        /// Runs `body` with scratch allocated for it (uninitialised: every use writes first).
        static func with(_ p: Problem, _ body: (Scratch) -> Void) {
            let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 3 * p.scratchCount)
            defer { buffer.deallocate() }
            body(Scratch(first: buffer, second: buffer + p.scratchCount, third: buffer + 2 * p.scratchCount))
        }

        /// Z (n·m, b) = X_n·W2ᵀ into `first`, regrouped as Zᵗ (m, n·b) into `second`.
        func regroupedZ(_ x: UnsafePointer<Float>, rows n: Int, w2: UnsafePointer<Float>, _ p: Problem) {
            BLAS.sgemm(transposeA: false, transposeB: true, m: n * p.m, n: p.b, k: p.c, alpha: 1,
                       a: x, lda: p.c, b: w2, ldb: p.c, beta: 0, c: first, ldc: p.b)
            swapLeadingAxes(first, into: second, outer: n, inner: p.m, block: p.b)
        }
    }

    /// dst (inner, outer, block) = src (outer, inner, block) with its two leading axes swapped.
    private static func swapLeadingAxes(_ src: UnsafePointer<Float>, into dst: UnsafeMutablePointer<Float>,
                                        outer: Int, inner: Int, block: Int) {
        for i in 0..<outer {
            for j in 0..<inner {
                (dst + (j * outer + i) * block).update(from: src + (i * inner + j) * block, count: block)
            }
        }
    }
}
