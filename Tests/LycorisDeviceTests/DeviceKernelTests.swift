import Foundation
import LycorisCUDA
import LycorisDevice
import LycorisTestSupport
import Testing

/// ``DeviceKernel``'s CUDA launches against lycoris_kernels.cu itself: on a GPU,
/// `cuLaunchKernel` reads each parameter with the size its declaration has, and nothing
/// checks the argument list — so here every case's argument kinds, in order, must be the
/// parameter types of the kernel of that name, and NVRTC must emit every kernel named.
@Suite struct DeviceKernelTests {
    /// One launch of each kind.
    static let samples: [DeviceKernel] = [
        .scale(out: 1, x: 2, s: 0.5, count: 3),
        .hadamard(out: 1, a: 2, b: 3, s: 0.5, count: 3),
        .add(out: 1, a: 2, b: 3, s: 0.5, count: 4),
        .kronecker(out: 1, a: 2, b: 3, s: 0.5, p: 1, q: 2, r: 3, t: 4, k: 5),
        .channelScale(out: 1, x: 2, w: 3, offset: 0, s: 1, stride: 4, channels: 5, count: 6),
        .channelDotParts(partials: 1, a: 2, b: 3, stride: 4, channels: 5, count: 6, parts: 7),
        .sumParts(out: 1, partials: 2, s: 0.5, channels: 3, parts: 4),
        .transpose(out: 1, input: 2, batch: 3, rows: 4, columns: 5, inner: 6),
        .columnCopy(out: 1, input: 2, rows: 3, width: 4, outColumns: 5, outFirst: 6, inColumns: 7, inFirst: 8),
    ]

    /// Kernel name → its parameters' kinds (pointer, float, u64, double) from the source text.
    static func declaredParameters() -> [String: [String]] {
        let pattern = try! NSRegularExpression(pattern: #"LYCORIS_KERNEL void (\w+)\(([^)]*)\)"#)
        let text = KernelSource.text
        var kernels: [String: [String]] = [:]
        for match in pattern.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
            let name = String(text[Range(match.range(at: 1), in: text)!])
            let parameters = text[Range(match.range(at: 2), in: text)!].split(separator: ",").map { parameter in
                let words = parameter.split(whereSeparator: \.isWhitespace)
                if parameter.contains("*") { return "pointer" }
                return String(words[words.count - 2])
            }
            kernels[name] = parameters
        }
        return kernels
    }

    @Test func everyLaunchPassesTheKernelsDeclaredParameters() {
        let declared = Self.declaredParameters()
        #expect(Set(Self.samples.map(\.name)) == Set(DeviceKernel.names), "a DeviceKernel case has no sample, or names is stale")
        for kernel in Self.samples {
            let kinds = kernel.arguments.map { argument -> String in
                switch argument {
                case .pointer: "pointer"
                case .float: "float"
                case .u64: "u64"
                case .double: "double"
                }
            }
            #expect(declared[kernel.name] == kinds, "\(kernel.name): launched with \(kinds), declared \(declared[kernel.name] ?? [])")
        }
    }

    @Test func threadCountsAreTheKernelsIndexRanges() {
        #expect(Self.samples.map(\.threads) == [3, 3, 4, 1 * 2 * 3 * 4 * 5, 6, 5 * 7, 3, 3 * 4 * 5 * 6, 3 * 4])
    }

    @Test func nvrtcEmitsEveryKernelTheBackendLaunches() throws {
        let directories = TorchLibraries.directories
        try #require(!directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let ptx = try NVRTC(directories: directories).compile(KernelSource.text, name: "lycoris_kernels.cu",
                                                             options: ["--gpu-architecture=compute_90"])
        for name in DeviceKernel.names { #expect(ptx.contains(".entry \(name)("), "\(name) is not in the PTX") }
    }
}
