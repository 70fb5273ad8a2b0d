import CLycorisKernelsCPU
import Foundation
import LycorisCore
import LycorisCUDA
import LycorisTestSupport
import Testing

/// The CUDA backend's kernels (Sources/LycorisCUDA/Kernels/lycoris_kernels.cu): NVRTC compiles
/// the file for compute capability 9.0, and each kernel, compiled as C and launched on the CPU
/// (every block and thread in turn, with block sizes that leave a partial last block), gives
/// the CPU engine's result. Nothing here runs on a GPU.
@Suite struct KernelTests {
    static let sourcePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Sources/LycorisCUDA/Kernels/lycoris_kernels.cu").path
    static let kernels = ["lycoris_scale", "lycoris_hadamard", "lycoris_add", "lycoris_kronecker", "lycoris_channel_scale",
                          "lycoris_channel_dot_parts", "lycoris_sum_parts", "lycoris_norm_affine", "lycoris_transpose", "lycoris_column_copy",
                          "lycoris_dropout_mask"]

    /// ⌈count / block⌉ blocks of `block` threads.
    static func grid(_ count: Int, _ block: UInt32) -> UInt32 { UInt32((count + Int(block) - 1) / Int(block)) }

    /// Runs `launch(grid, block, out)` into a fresh buffer of `count` floats.
    static func launched(_ count: Int, block: UInt32 = 7,
                         _ launch: (UInt32, UInt32, UnsafeMutablePointer<Float>) -> Void) -> [Float] {
        var out = [Float](repeating: .nan, count: count)
        out.withUnsafeMutableBufferPointer { launch(grid(count, block), block, $0.baseAddress!) }
        return out
    }

    @Test func theServerEmbedsTheKernelFileByteForByte() throws {
        let file = try String(contentsOfFile: Self.sourcePath, encoding: .utf8)
        #expect(KernelSource.text == file, "KernelSource.swift is stale: run python3 scripts/embed_kernels.py and rebuild")
    }

    @Test func nvrtcCompilesEveryKernelForComputeCapability90() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let nvrtc = try NVRTC(directories: TorchLibraries.directories)
        let source = try String(contentsOfFile: Self.sourcePath, encoding: .utf8)
        let ptx = try nvrtc.compile(source, name: "lycoris_kernels.cu", options: ["--gpu-architecture=compute_90"])
        #expect(ptx.contains(".target sm_90"))
        for kernel in Self.kernels { #expect(ptx.contains(".entry \(kernel)("), "\(kernel) is not in the PTX") }
    }

    @Test func scaleHadamardAndAddAreTheEnginesOperations() {
        let a = randomTensor([5, 9], seed: 1), b = randomTensor([5, 9], seed: 2)
        let scaled = Self.launched(a.count) { lycoris_cpu_scale($0, $1, $2, a.scalars, 0.75, UInt64(a.count)) }
        expectClose(Tensor(shape: a.shape, scalars: scaled), a * 0.75, tolerance: 1e-7, "scale")
        let product = Self.launched(a.count) { lycoris_cpu_hadamard($0, $1, $2, a.scalars, b.scalars, 0.5, UInt64(a.count)) }
        expectClose(Tensor(shape: a.shape, scalars: product), a * b * 0.5, tolerance: 1e-7, "hadamard")
        let sum = Self.launched(a.count) { lycoris_cpu_add($0, $1, $2, a.scalars, b.scalars, -2, UInt64(a.count)) }
        expectClose(Tensor(shape: a.shape, scalars: sum), a - b * 2, tolerance: 1e-7, "add")
    }

    @Test(arguments: [[4, 5, 3, 3], [4, 5]])
    func kroneckerIsTheEnginesKronecker(bShape: [Int]) {
        let a = randomTensor([3, 2], seed: 3), b = randomTensor(bShape, seed: 4)
        let expected = Tensor.kronecker(a, b) * 1.5
        let (r, t) = (UInt64(bShape[0]), UInt64(bShape[1]))
        let k = UInt64(bShape[2...].reduce(1, *))
        let out = Self.launched(expected.count, block: 32) {
            lycoris_cpu_kronecker($0, $1, $2, a.scalars, b.scalars, 1.5, 3, 2, r, t, k)
        }
        expectClose(Tensor(shape: expected.shape, scalars: out), expected, tolerance: 1e-7, "kron")
    }

    @Test func channelScaleRunsAlongRowsOrColumnsWithAnOffsetAndAScale() {
        // W0 (O=4, I=3, kernel 2×2): IA3 on output scales rows (stride I·4), on input columns (stride 4).
        let w0 = randomTensor([4, 3, 2, 2], seed: 5), rows = randomTensor([4], seed: 6), columns = randomTensor([3], seed: 7)
        var expectedRows = w0, expectedColumns = w0
        for o in 0..<4 { for i in 0..<3 { for e in 0..<4 {
            let index = (o * 3 + i) * 4 + e
            expectedRows.scalars[index] = w0.scalars[index] * (0.5 * rows.scalars[o])
            expectedColumns.scalars[index] = w0.scalars[index] * (1 + 0.25 * columns.scalars[i])
        } } }
        let alongRows = Self.launched(w0.count) {
            lycoris_cpu_channel_scale($0, $1, $2, w0.scalars, rows.scalars, 0, 0.5, 12, 4, UInt64(w0.count))
        }
        let alongColumns = Self.launched(w0.count) {
            lycoris_cpu_channel_scale($0, $1, $2, w0.scalars, columns.scalars, 1, 0.25, 4, 3, UInt64(w0.count))
        }
        expectClose(Tensor(shape: w0.shape, scalars: alongRows), expectedRows, tolerance: 1e-7, "IA3 rows, m·ΔW")
        expectClose(Tensor(shape: w0.shape, scalars: alongColumns), expectedColumns, tolerance: 1e-7, "IA3 columns, W'")
    }

    /// The reduction of channel_scale: per-channel sums of a ⊙ b along rows or columns, and a
    /// whole dot product (one channel), each split into parts, against sums written out here
    /// in Double.
    @Test(arguments: [1, 2, 5])
    func channelDotSumsEachChannelsProducts(parts: Int) {
        let a = randomTensor([4, 3, 2, 2], seed: 20), b = randomTensor([4, 3, 2, 2], seed: 21)
        var rows = [Double](repeating: 0, count: 4), columns = [Double](repeating: 0, count: 3), total = 0.0
        for o in 0..<4 { for i in 0..<3 { for e in 0..<4 {
            let index = (o * 3 + i) * 4 + e
            let product = Double(a.scalars[index]) * Double(b.scalars[index])
            rows[o] += product
            columns[i] += product
            total += product
        } } }
        /// The two launches: parts, then their sums times s.
        func reduced(scale s: Float, stride: Int, channels: Int) -> [Float] {
            var partials = [Double](repeating: .nan, count: channels * parts)
            partials.withUnsafeMutableBufferPointer {
                lycoris_cpu_channel_dot_parts(Self.grid(channels * parts, 3), 3, $0.baseAddress!, a.scalars, b.scalars,
                                              UInt64(stride), UInt64(channels), UInt64(a.count), UInt64(parts))
            }
            return Self.launched(channels, block: 2) {
                lycoris_cpu_sum_parts($0, $1, $2, partials, s, UInt64(channels), UInt64(parts))
            }
        }
        expectClose(Tensor(shape: [4], scalars: reduced(scale: 2, stride: 12, channels: 4)),
                    Tensor(shape: [4], scalars: rows.map { Float(2 * $0) }), tolerance: 1e-6, "rows")
        expectClose(Tensor(shape: [3], scalars: reduced(scale: 1, stride: 4, channels: 3)),
                    Tensor(shape: [3], scalars: columns.map { Float($0) }), tolerance: 1e-6, "columns")
        let dot = reduced(scale: 0.5, stride: 1, channels: 1)
        #expect(abs(dot[0] - Float(0.5 * total)) <= 1e-6 * abs(Float(total)))
    }

    @Test func normAffineIsTheEnginesLayerAndGroupNorm() {
        let layer = Normalization(kind: .layer(normalizedShape: [2, 3]), eps: 1e-5)
        let x = randomTensor([5, 2, 3], seed: 8, std: 3), w = randomTensor([2, 3], seed: 9)
        let out = Self.launched(x.count, block: 2) {
            lycoris_cpu_norm_affine($0, $1, $2, x.scalars, w.scalars, 5, 6, 1, 6, 1e-5)
        }
        expectClose(Tensor(shape: x.shape, scalars: out), layer.forward(x, weight: w), tolerance: 1e-6, "layer norm")

        let group = Normalization(kind: .group(groups: 2, channels: 4), eps: 1e-6)
        let y = randomTensor([3, 4, 2, 3], seed: 10), v = randomTensor([4], seed: 11)
        let blocks = 3 * 2, length = 2 * 6
        let grouped = Self.launched(y.count, block: 4) {
            lycoris_cpu_norm_affine($0, $1, $2, y.scalars, v.scalars, UInt64(blocks), UInt64(length), 6, 4, 1e-6)
        }
        expectClose(Tensor(shape: y.shape, scalars: grouped), group.forward(y, weight: v), tolerance: 1e-6, "group norm")
    }

    @Test(arguments: [1, 3])
    func transposeSwapsTheMiddleAxesOfBlocks(inner: Int) {
        let x = randomTensor([3, 4, 5, inner], seed: 12)
        let out = Self.launched(x.count) { lycoris_cpu_transpose($0, $1, $2, x.scalars, 3, 4, 5, UInt64(inner)) }
        #expect(out == x.permuted([0, 2, 1, 3]).scalars)
    }

    @Test func columnCopyTakesAndPutsBackDyLoRAsRankBlock() {
        let up = randomTensor([6, 8], seed: 13)
        let block = Self.launched(6 * 3) { lycoris_cpu_column_copy($0, $1, $2, up.scalars, 6, 3, 3, 0, 8, 2) }
        #expect(block == (0..<6).flatMap { row in (2..<5).map { up.scalars[row * 8 + $0] } })
        var placed = [Float](repeating: 0, count: 6 * 8)
        placed.withUnsafeMutableBufferPointer { lycoris_cpu_column_copy(Self.grid(6 * 3, 7), 7, $0.baseAddress!, block, 6, 3, 8, 2, 3, 0) }
        #expect(placed == up.scalars.enumerated().map { (2..<5).contains($0.offset % 8) ? $0.element : 0 })
    }

    /// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    @Test(arguments: [
        ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff],
         [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
         [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
    ] as [([UInt32], [UInt32], [UInt32])])
    func philoxMatchesItsKnownAnswers(counter: [UInt32], key: [UInt32], expected: [UInt32]) {
        var out = [UInt32](repeating: 0, count: 4)
        lycoris_cpu_philox4x32_10(counter, key, &out)
        #expect(out == expected)
    }

    @Test func dropoutMaskDependsOnSeedAndIndexOnly() {
        let n = 20_000, p: Float = 0.3
        let mask = Self.launched(n, block: 7) { lycoris_cpu_dropout_mask($0, $1, $2, p, UInt64(n), 42, 0) }
        let wide = Self.launched(n, block: 256) { lycoris_cpu_dropout_mask($0, $1, $2, p, UInt64(n), 42, 0) }
        #expect(mask == wide, "the mask depends on the launch shape")
        #expect(mask.allSatisfy { $0 == 0 || $0 == 1 / (1 - p) })
        let dropped = Double(mask.filter { $0 == 0 }.count) / Double(n)
        #expect(abs(dropped - 0.3) < 0.015, "dropped fraction \(dropped)")  // 4.6 σ of a binomial
        let shifted = Self.launched(n, block: 64) { lycoris_cpu_dropout_mask($0, $1, $2, p, UInt64(n), 42, 1) }
        #expect(Array(shifted[..<(n - 4)]) == Array(mask[4...]), "offset 1 is the next 4 elements")
        let other = Self.launched(n, block: 64) { lycoris_cpu_dropout_mask($0, $1, $2, p, UInt64(n), 43, 0) }
        #expect(other != mask)
    }
}
