import Foundation
import LycorisCore
import Testing

/// `channelAffine` and `channelSums` against per-element loops over the (outer, C, inner)
/// index, on a row layout (inner 1) and a block layout (inner > 1) large enough to be split
/// over workers, with lengths that leave SIMD tails and several summation blocks.
@Suite struct ChannelKernelsTests {
    /// (outer, channels, inner): linear rows, a conv activation with odd spatial size.
    static let layouts = [(3001, 37, 1), (3, 5, 4099), (2, 3, 7)]

    private func channel(_ index: Int, _ layout: ChannelLayout) -> Int { (index / layout.inner) % layout.channels }

    @Test(arguments: layouts)
    func affineIsPerElementScaleAndShift(outer: Int, channels: Int, inner: Int) {
        let shape = [outer, channels, inner]
        let t = uniformTensor(shape, seed: 7)
        let s = uniformTensor([channels], seed: 8).scalars, h = uniformTensor([channels], seed: 9).scalars
        let layout = ChannelLayout(count: t.count, channels: channels, inner: inner)
        let y = t.channelAffine(layout, scales: s, shifts: h)
        #expect(y.shape == shape)
        #expect(y.scalars == t.scalars.indices.map { t.scalars[$0] * s[channel($0, layout)] + h[channel($0, layout)] })
        #expect(t.channelAffine(layout, scales: s).scalars == t.scalars.indices.map { t.scalars[$0] * s[channel($0, layout)] })
        #expect(t.channelAffine(layout, scales: nil, shifts: h).scalars == t.scalars.indices.map { t.scalars[$0] + h[channel($0, layout)] })
    }

    /// Integers in −8…8: every partial sum is an integer under 2²⁴, so Float sums are exact.
    @Test(arguments: layouts)
    func sumsAreExactOnIntegers(outer: Int, channels: Int, inner: Int) {
        let shape = [outer, channels, inner]
        let t = integerTensor(shape, seed: 11), u = integerTensor(shape, seed: 12)
        let d = integerTensor([channels], seed: 13).scalars
        let layout = ChannelLayout(count: t.count, channels: channels, inner: inner)
        var plain = [Double](repeating: 0, count: channels), weighted = plain
        for i in t.scalars.indices {
            let c = channel(i, layout)
            plain[c] += Double(t.scalars[i])
            weighted[c] += Double(t.scalars[i]) * Double(u.scalars[i] - d[c])
        }
        #expect(t.channelSums(layout) == plain.map(Float.init))
        #expect(t.channelSums(layout, times: u, minus: d) == weighted.map(Float.init))
        #expect(plain.contains { $0 != 0 } && weighted.contains { $0 != 0 })
    }

    /// Uniform values over 2²⁰ terms per channel: blocked Float accumulation stays within
    /// a few ulps of the Double sum (a plain running Float sum drifts by ~1e-4 here).
    @Test func longSumsStayAccurate() {
        let shape = [1 << 19, 2]
        let t = uniformTensor(shape, seed: 21).map { $0 + 1 }, u = uniformTensor(shape, seed: 22)
        let layout = ChannelLayout(count: t.count, channels: 2, inner: 1)
        var exact = [0.0, 0.0]
        for i in t.scalars.indices { exact[i % 2] += Double(t.scalars[i]) * Double(u.scalars[i] - 0.25) }
        let sums = t.channelSums(layout, times: u, minus: [0.25, 0.25])
        #expect(relativeError(sums, exact) < 1e-6)
        let blocks = t.reshaped([1, 2, 1 << 19]).channelSums(ChannelLayout(count: t.count, channels: 2, inner: 1 << 19))
        let halves = [0, 1].map { c in t.scalars[(c << 19)..<((c + 1) << 19)].reduce(0.0) { $0 + Double($1) } }
        #expect(relativeError(blocks, halves) < 1e-6)
    }

    @Test func rangesCoverEveryIndexOnce() {
        for (count, workers) in [(10, 3), (2, 2), (1000, 7), (5, 1)] {
            let visits = UnsafeMutableBufferPointer<Int>.allocate(capacity: count)
            visits.initialize(repeating: 0)
            defer { visits.deallocate() }
            let owners = UnsafeMutableBufferPointer<Int>.allocate(capacity: count)
            defer { owners.deallocate() }
            ParallelRanges.run(count: count, workers: workers) { range, w in
                for i in range { visits[i] += 1; owners[i] = w }
            }
            #expect(visits.allSatisfy { $0 == 1 })
            #expect(zip(owners, owners.dropFirst()).allSatisfy { $0 <= $1 } && owners.last == workers - 1)
        }
    }
}
