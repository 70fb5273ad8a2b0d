/// A tensor seen as (outer, C, inner) around its channel axis: a linear layer's activation
/// (…, C) is (rows, C, 1); a convolution's (N, C, spatial…) is (N, C, Π spatial).
public struct ChannelLayout: Sendable, Equatable {
    public let outer: Int, channels: Int, inner: Int

    /// The layout of `count` elements with `channels` channels, `inner` elements apart.
    public init(count: Int, channels: Int, inner: Int) {
        precondition(channels > 0 && inner > 0 && count % (channels * inner) == 0,
                     "\(count) elements are not (outer, \(channels), \(inner))")
        (outer, self.channels, self.inner) = (count / (channels * inner), channels, inner)
    }
}

/// Per-channel passes, each one contiguous sweep without a division per element, split over
/// the engine's threads (``ParallelRanges``):
///
///     affine:  y[o, c, i] = t[o, c, i] · s[c] + h[c]
///     sums:    Σ_{o, i} t[o, c, i] · (u[o, c, i] − d[c])   (u absent: t alone; d absent: 0)
///
/// Sums accumulate in Float over blocks of at most ``sumBlock`` terms per channel and add
/// the blocks in Double, so the error grows with the block length, not with the tensor.
extension Tensor {
    static let sumBlock = 1024

    /// t ⊙ s + h along the channel axis of `layout` (nil scales: 1; nil shifts: 0).
    public func channelAffine(_ layout: ChannelLayout, scales: [Float]?, shifts: [Float]? = nil) -> Tensor {
        precondition(layout.outer * layout.channels * layout.inner == count, "layout \(layout) for shape \(shape)")
        let s = scales ?? [Float](repeating: 1, count: layout.channels)
        let h = shifts ?? [Float](repeating: 0, count: layout.channels)
        precondition(s.count == layout.channels && h.count == layout.channels, "\(s.count) scales, \(h.count) shifts for \(layout.channels) channels")
        var result = Tensor(uninitializedShape: shape)
        let (channels, inner) = (layout.channels, layout.inner)
        scalars.withUnsafeBufferPointer { t in
            result.scalars.withUnsafeMutableBufferPointer { y in
                s.withUnsafeBufferPointer { s in
                    h.withUnsafeBufferPointer { h in
                        let (t, y, s, h) = (t.baseAddress!, y.baseAddress!, s.baseAddress!, h.baseAddress!)
                        // Items: rows of C elements (inner 1) or blocks of `inner` (one channel).
                        let rows = inner == 1
                        let items = rows ? layout.outer : layout.outer * channels
                        let itemLength = rows ? channels : inner
                        let workers = ParallelRanges.workers(count: items, workPerItem: itemLength)
                        ParallelRanges.run(count: items, workers: workers) { range, _ in
                            for item in range {
                                let (src, dst) = (t + item * itemLength, y + item * itemLength)
                                if rows {
                                    for c in 0..<channels { dst[c] = src[c] * s[c] + h[c] }
                                } else {
                                    let (scale, shift) = (s[item % channels], h[item % channels])
                                    for i in 0..<inner { dst[i] = src[i] * scale + shift }
                                }
                            }
                        }
                    }
                }
            }
        }
        return result
    }

    /// Σ_{o, i} t · (u − d[c]) per channel c of `layout` (see the extension's comment).
    public func channelSums(_ layout: ChannelLayout, times other: Tensor? = nil, minus offsets: [Float]? = nil) -> [Float] {
        precondition(layout.outer * layout.channels * layout.inner == count, "layout \(layout) for shape \(shape)")
        precondition(other.map { $0.count == count } ?? true, "channel sums of \(shape) and \(other!.shape)")
        let d = offsets ?? [Float](repeating: 0, count: layout.channels)
        precondition(d.count == layout.channels, "\(d.count) offsets for \(layout.channels) channels")
        let (channels, inner) = (layout.channels, layout.inner)
        let rows = inner == 1
        let items = rows ? layout.outer : layout.outer * channels
        let workers = ParallelRanges.workers(count: items, workPerItem: rows ? channels : inner)
        // Worker w's totals in [w·C, (w+1)·C), added in worker order at the end.
        var totals = [Double](repeating: 0, count: workers * channels)
        let u = other?.scalars ?? []
        scalars.withUnsafeBufferPointer { t in
            u.withUnsafeBufferPointer { u in
                d.withUnsafeBufferPointer { d in
                    totals.withUnsafeMutableBufferPointer { totals in
                        let (t, u, d, totals) = (t.baseAddress!, other == nil ? nil : u.baseAddress, d.baseAddress!, totals.baseAddress!)
                        ParallelRanges.run(count: items, workers: workers) { range, w in
                            let mine = totals + w * channels
                            if rows {
                                Self.rowSums(t, u, d, rows: range, channels: channels, into: mine)
                            } else {
                                for item in range {
                                    let offset = item * inner
                                    mine[item % channels] += Self.blockSum(t + offset, u.map { $0 + offset }, d[item % channels], count: inner)
                                }
                            }
                        }
                    }
                }
            }
        }
        var sums = [Double](repeating: 0, count: channels)
        for w in 0..<workers { for c in 0..<channels { sums[c] += totals[w * channels + c] } }
        return sums.map(Float.init)
    }

    /// Adds Σ over `rows` of t[r, c] · (u[r, c] − d[c]) to `totals[c]`: rows summed in Float
    /// ``sumBlock`` at a time (a vectorisable loop over c), each block added in Double.
    private static func rowSums(_ t: UnsafePointer<Float>, _ u: UnsafePointer<Float>?, _ d: UnsafePointer<Float>,
                                rows: Range<Int>, channels: Int, into totals: UnsafeMutablePointer<Double>) {
        let block = UnsafeMutablePointer<Float>.allocate(capacity: channels)
        defer { block.deallocate() }
        var start = rows.lowerBound
        while start < rows.upperBound {
            let end = Swift.min(start + sumBlock, rows.upperBound)
            block.update(repeating: 0, count: channels)
            for r in start..<end {
                let row = t + r * channels
                if let u {
                    let other = u + r * channels
                    for c in 0..<channels { block[c] += row[c] * (other[c] - d[c]) }
                } else {
                    for c in 0..<channels { block[c] += row[c] }
                }
            }
            for c in 0..<channels { totals[c] += Double(block[c]) }
            start = end
        }
    }

    /// Σ t[i] · (u[i] − d) over `count` contiguous elements (u nil: Σ t[i]), eight lanes in
    /// Float, ``sumBlock`` elements at a time, the blocks added in Double.
    private static func blockSum(_ t: UnsafePointer<Float>, _ u: UnsafePointer<Float>?, _ d: Float, count: Int) -> Double {
        var total = 0.0
        var start = 0
        while start < count {
            let end = Swift.min(start + sumBlock, count)
            var lanes = SIMD8<Float>.zero
            var tail: Float = 0
            var i = start
            if let u {
                let offset = SIMD8<Float>(repeating: d)
                while i + 8 <= end {
                    lanes += load8(t + i) * (load8(u + i) - offset)
                    i += 8
                }
                while i < end { tail += t[i] * (u[i] - d); i += 1 }
            } else {
                while i + 8 <= end { lanes += load8(t + i); i += 8 }
                while i < end { tail += t[i]; i += 1 }
            }
            total += Double(lanes.sum() + tail)
            start = end
        }
        return total
    }

    @inline(__always)
    private static func load8(_ p: UnsafePointer<Float>) -> SIMD8<Float> {
        UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
    }
}
