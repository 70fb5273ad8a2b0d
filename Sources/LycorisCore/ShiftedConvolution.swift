/// Stride-1 convolution without a patch matrix: one GEMM per kernel tap, on a shifted
/// window of the zero-padded input.
///
/// With a sample's group zero-padded to (C/g, Dp, Hp, Wp) and each channel flattened to
/// length L = Dp·Hp·Wp, output position (oz, oy, ox) sits at grid column
/// q = (oz·Hp + oy)·Wp + ox, and kernel tap t = (a, i, j) reads input column q + o_t,
/// o_t = (a·d₀·Hp + i·d₁)·Wp + j·d₂ (d the dilation), for every q alike: the tap's patch rows
/// are the (C/g, n) window of the padded input at o_t, leading dimension L, where n is the
/// last output position's column + 1 (the windows end inside L). So, per sample and group,
/// with W_t the (O/g, C/g) weights of tap t:
///
///     Y_grid (O/g, n)       = Σ_t W_t · Xpad[:, o_t ..< o_t + n]
///     ∂W_t                 += ∂Y_grid · Xpad[:, o_t ..< o_t + n]ᵀ
///     ∂Xpad[:, o_t ..< o_t + n] += W_tᵀ · ∂Y_grid
///
/// Grid columns that are no output position (ox ≥ Wo, or oy ≥ Ho inside a depth slab) are
/// computed and dropped by the forward and are zero in ∂Y_grid. The multiply-adds are those
/// of im2col + GEMM (a factor n/P more, P the output positions, ~1.03 for 3×3 on 64×64);
/// what goes is the (C/g·K, P) patch matrix, written and read once per pass, and col2im.
struct ShiftedConvolution {
    let plan: Convolution.Plan
    /// Padded extents and one padded channel's length L.
    let paddedHeight: Int, paddedWidth: Int, channelLength: Int
    /// Grid columns per output row block: n.
    let gridLength: Int
    /// o_t for every tap t, in the weight's (kd, kh, kw) order.
    let tapOffsets: [Int]

    /// Whether `plan` on `batch` samples is a convolution this strategy computes: stride 1 on
    /// every axis, a patch matrix to save (not pointwise), at least one sample, and at least
    /// as many output positions as output channels — the (C/g·K, P) patch matrix it saves is
    /// then no smaller than the weight it copies tap-major, and each tap's GEMM is wide
    /// (8×8 maps with 1280 channels go through im2col).
    static func applies(to plan: Convolution.Plan, batch: Int) -> Bool {
        plan.stride == [1, 1, 1] && !plan.isPointwise && batch > 0 && plan.outPositions >= plan.geometry.outChannels
    }

    init(plan: Convolution.Plan) {
        self.plan = plan
        let paddedDepth = plan.depth + 2 * plan.padding[0]
        paddedHeight = plan.height + 2 * plan.padding[1]
        paddedWidth = plan.width + 2 * plan.padding[2]
        channelLength = paddedDepth * paddedHeight * paddedWidth
        gridLength = ((plan.outDepth - 1) * paddedHeight + plan.outHeight - 1) * paddedWidth + plan.outWidth
        var offsets: [Int] = []
        for a in 0..<plan.kernel[0] {
            for i in 0..<plan.kernel[1] {
                for j in 0..<plan.kernel[2] {
                    offsets.append((a * plan.dilation[0] * paddedHeight + i * plan.dilation[1]) * paddedWidth + j * plan.dilation[2])
                }
            }
        }
        tapOffsets = offsets
    }

    private var taps: Int { tapOffsets.count }
    private var inGroup: Int { plan.channelsPerGroup }
    private var outGroup: Int { plan.outPerGroup }

    /// y (N, O, out…) = conv(x, weight).
    func forward(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, output y: UnsafeMutablePointer<Float>, batch: Int) {
        tapMajor(weight).withUnsafeBufferPointer { wt in
            forEachSampleGroup(batch: batch) { n, g, padded, grid in
                pad(x + plan.inputOffset(sample: n, group: g), into: padded)
                for t in 0..<taps {
                    BLAS.sgemm(transposeA: false, transposeB: false, m: outGroup, n: gridLength, k: inGroup, alpha: 1,
                               a: tapSlice(wt.baseAddress!, tap: t, group: g), lda: inGroup,
                               b: padded + tapOffsets[t], ldb: channelLength,
                               beta: t == 0 ? 0 : 1, c: grid, ldc: gridLength)
                }
                crop(grid, rows: outGroup, into: y + plan.outputOffset(sample: n, group: g))
            }
        }
    }

    /// ∂x (N, C, in…) from ∂y.
    func backwardInput(_ gy: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradInput gx: UnsafeMutablePointer<Float>, batch: Int) {
        tapMajor(weight).withUnsafeBufferPointer { wt in
            forEachSampleGroup(batch: batch) { n, g, padded, grid in
                spread(gy + plan.outputOffset(sample: n, group: g), rows: outGroup, into: grid)
                padded.update(repeating: 0, count: inGroup * channelLength)
                for t in 0..<taps {
                    BLAS.sgemm(transposeA: true, transposeB: false, m: inGroup, n: gridLength, k: outGroup, alpha: 1,
                               a: tapSlice(wt.baseAddress!, tap: t, group: g), lda: inGroup,
                               b: grid, ldb: gridLength,
                               beta: 1, c: padded + tapOffsets[t], ldc: channelLength)
                }
                unpad(padded, into: gx + plan.inputOffset(sample: n, group: g))
            }
        }
    }

    /// ∂W (O, C/g, k…) from x and ∂y.
    func backwardWeight(_ x: UnsafePointer<Float>, gradOutput gy: UnsafePointer<Float>, gradWeight gw: UnsafeMutablePointer<Float>, batch: Int) {
        let sliceLength = plan.geometry.outChannels * inGroup
        var tapGrads = [Float](repeating: 0, count: taps * sliceLength)
        tapGrads.withUnsafeMutableBufferPointer { tg in
            forEachSampleGroup(batch: batch) { n, g, padded, grid in
                pad(x + plan.inputOffset(sample: n, group: g), into: padded)
                spread(gy + plan.outputOffset(sample: n, group: g), rows: outGroup, into: grid)
                for t in 0..<taps {
                    BLAS.sgemm(transposeA: false, transposeB: true, m: outGroup, n: inGroup, k: gridLength, alpha: 1,
                               a: grid, lda: gridLength, b: padded + tapOffsets[t], ldb: channelLength,
                               beta: 1, c: tg.baseAddress! + t * sliceLength + g * outGroup * inGroup, ldc: inGroup)
                }
            }
            // (K, O, C/g) → (O, C/g, K).
            for t in 0..<taps {
                for row in 0..<sliceLength { gw[row * taps + t] = tg[t * sliceLength + row] }
            }
        }
    }

    /// Runs `body(n, g, padded, grid)` for every sample n and group g, with scratch for one
    /// padded group (C/g, L) and one grid (O/g, n) shared by all of them.
    private func forEachSampleGroup(batch: Int, _ body: (_ n: Int, _ g: Int, _ padded: UnsafeMutablePointer<Float>,
                                                         _ grid: UnsafeMutablePointer<Float>) -> Void) {
        let padded = UnsafeMutablePointer<Float>.allocate(capacity: inGroup * channelLength)
        let grid = UnsafeMutablePointer<Float>.allocate(capacity: outGroup * gridLength)
        defer { padded.deallocate(); grid.deallocate() }
        for n in 0..<batch {
            for g in 0..<plan.geometry.groups { body(n, g, padded, grid) }
        }
    }

    /// The weight (O, C/g, K) as (K, O, C/g): tap t's (O, C/g) matrix contiguous.
    private func tapMajor(_ weight: UnsafePointer<Float>) -> [Float] {
        let sliceLength = plan.geometry.outChannels * inGroup
        return [Float](unsafeUninitializedCapacity: taps * sliceLength) { buffer, count in
            for row in 0..<sliceLength {
                for t in 0..<taps { buffer[t * sliceLength + row] = weight[row * taps + t] }
            }
            count = taps * sliceLength
        }
    }

    /// W_t of group g: rows g·O/g ..< (g+1)·O/g of tap t's (O, C/g) matrix.
    private func tapSlice(_ tapWeights: UnsafePointer<Float>, tap t: Int, group g: Int) -> UnsafePointer<Float> {
        tapWeights + t * plan.geometry.outChannels * inGroup + g * outGroup * inGroup
    }

    /// Calls `body(padded, input)` for every input row (z, y) of a channel: the offsets of its
    /// first element in the padded channel and in the input channel.
    @inline(__always)
    private func forEachInputRow(_ body: (_ padded: Int, _ input: Int) -> Void) {
        for z in 0..<plan.depth {
            for y in 0..<plan.height {
                let paddedRow = ((z + plan.padding[0]) * paddedHeight + y + plan.padding[1]) * paddedWidth + plan.padding[2]
                body(paddedRow, (z * plan.height + y) * plan.width)
            }
        }
    }

    /// The group's C/g input channels, zero-padded, into `padded` (C/g, L).
    private func pad(_ x: UnsafePointer<Float>, into padded: UnsafeMutablePointer<Float>) {
        padded.update(repeating: 0, count: inGroup * channelLength)
        for c in 0..<inGroup {
            let (source, target) = (x + c * plan.inPositions, padded + c * channelLength)
            forEachInputRow { (target + $0).update(from: source + $1, count: plan.width) }
        }
    }

    /// The interior of `padded` (C/g, L) into the group's input gradient.
    private func unpad(_ padded: UnsafePointer<Float>, into gx: UnsafeMutablePointer<Float>) {
        for c in 0..<inGroup {
            let (source, target) = (padded + c * channelLength, gx + c * plan.inPositions)
            forEachInputRow { (target + $1).update(from: source + $0, count: plan.width) }
        }
    }

    /// Calls `body(gridColumn, position)` for the first column of every output row (oz, oy).
    @inline(__always)
    private func forEachOutputRow(_ body: (_ grid: Int, _ output: Int) -> Void) {
        for oz in 0..<plan.outDepth {
            for oy in 0..<plan.outHeight {
                body((oz * paddedHeight + oy) * paddedWidth, (oz * plan.outHeight + oy) * plan.outWidth)
            }
        }
    }

    /// The output positions of `rows` grid rows (rows, n) into (rows, P).
    private func crop(_ grid: UnsafePointer<Float>, rows: Int, into y: UnsafeMutablePointer<Float>) {
        for r in 0..<rows {
            let (source, target) = (grid + r * gridLength, y + r * plan.outPositions)
            forEachOutputRow { (target + $1).update(from: source + $0, count: plan.outWidth) }
        }
    }

    /// (rows, P) onto a zeroed (rows, n) grid.
    private func spread(_ gy: UnsafePointer<Float>, rows: Int, into grid: UnsafeMutablePointer<Float>) {
        grid.update(repeating: 0, count: rows * gridLength)
        for r in 0..<rows {
            let (source, target) = (gy + r * plan.outPositions, grid + r * gridLength)
            forEachOutputRow { (target + $0).update(from: source + $1, count: plan.outWidth) }
        }
    }
}
