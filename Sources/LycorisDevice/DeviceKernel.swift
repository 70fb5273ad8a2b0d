import LycorisCUDA

/// One launch of a kernel of Sources/LycorisCUDA/Kernels/lycoris_kernels.cu with its arguments
/// (addresses are device memory; extents are element counts). Each case's comment is the
/// kernel's formula; the source file has the details.
///
/// ``CUDADevice`` launches ``name`` with ``arguments`` over ``threads`` threads (one per
/// output element; per channel and part for the reduction); ``EmulatedDevice`` calls the same kernel
/// compiled as C (CLycorisKernelsCPU).
public enum DeviceKernel: Sendable, Equatable {
    /// out = s · x (n elements).
    case scale(out: UInt64, x: UInt64, s: Float, count: Int)
    /// out = s · (a ⊙ b).
    case hadamard(out: UInt64, a: UInt64, b: UInt64, s: Float, count: Int)
    /// out = a + s · b.
    case add(out: UInt64, a: UInt64, b: UInt64, s: Float, count: Int)
    /// out = s · kron(A (p, q), B (r, t, k)) → (p·r, q·t, k).
    case kronecker(out: UInt64, a: UInt64, b: UInt64, s: Float, p: Int, q: Int, r: Int, t: Int, k: Int)
    /// out[e] = x[e] · (offset + s · w[⌊e / stride⌋ mod channels]).
    case channelScale(out: UInt64, x: UInt64, w: UInt64, offset: Float, s: Float, stride: Int, channels: Int, count: Int)
    /// partials[c·parts + j] (doubles) = part j of Σ a[e]·b[e] over the elements of channel c
    /// (⌊e / stride⌋ mod channels = c); ``sumParts`` finishes the reduction.
    case channelDotParts(partials: UInt64, a: UInt64, b: UInt64, stride: Int, channels: Int, count: Int, parts: Int)
    /// out[c] = s · Σ_j partials[c·parts + j].
    case sumParts(out: UInt64, partials: UInt64, s: Float, channels: Int, parts: Int)
    /// in (batch, rows, columns, inner) → out (batch, columns, rows, inner).
    case transpose(out: UInt64, input: UInt64, batch: Int, rows: Int, columns: Int, inner: Int)
    /// out[row, outFirst + c] = in[row, inFirst + c] for c < width, rows of outColumns / inColumns.
    case columnCopy(out: UInt64, input: UInt64, rows: Int, width: Int, outColumns: Int, outFirst: Int, inColumns: Int,
                    inFirst: Int)

    /// Every kernel a ``DeviceKernel`` launches (the functions ``CUDADevice`` loads).
    public static let names = ["lycoris_scale", "lycoris_hadamard", "lycoris_add", "lycoris_kronecker", "lycoris_channel_scale",
                               "lycoris_channel_dot_parts", "lycoris_sum_parts", "lycoris_transpose", "lycoris_column_copy"]

    public var name: String {
        switch self {
        case .scale: "lycoris_scale"
        case .hadamard: "lycoris_hadamard"
        case .add: "lycoris_add"
        case .kronecker: "lycoris_kronecker"
        case .channelScale: "lycoris_channel_scale"
        case .channelDotParts: "lycoris_channel_dot_parts"
        case .sumParts: "lycoris_sum_parts"
        case .transpose: "lycoris_transpose"
        case .columnCopy: "lycoris_column_copy"
        }
    }

    /// The launch's thread count (the kernel's 1-D index range).
    public var threads: Int {
        switch self {
        case let .scale(_, _, _, count), let .hadamard(_, _, _, _, count), let .add(_, _, _, _, count),
             let .channelScale(_, _, _, _, _, _, _, count):
            count
        case let .kronecker(_, _, _, _, p, q, r, t, k): p * q * r * t * k
        case let .channelDotParts(_, _, _, _, channels, _, parts): channels * parts
        case let .sumParts(_, _, _, channels, _): channels
        case let .transpose(_, _, batch, rows, columns, inner): batch * rows * columns * inner
        case let .columnCopy(_, _, rows, width, _, _, _, _): rows * width
        }
    }

    /// The kernel's parameters in declaration order, as `cuLaunchKernel` reads them.
    public var arguments: [CUDAContext.Argument] {
        func size(_ value: Int) -> CUDAContext.Argument { .u64(UInt64(value)) }
        switch self {
        case let .scale(out, x, s, count):
            return [.pointer(out), .pointer(x), .float(s), size(count)]
        case let .hadamard(out, a, b, s, count), let .add(out, a, b, s, count):
            return [.pointer(out), .pointer(a), .pointer(b), .float(s), size(count)]
        case let .kronecker(out, a, b, s, p, q, r, t, k):
            return [.pointer(out), .pointer(a), .pointer(b), .float(s), size(p), size(q), size(r), size(t), size(k)]
        case let .channelScale(out, x, w, offset, s, stride, channels, count):
            return [.pointer(out), .pointer(x), .pointer(w), .float(offset), .float(s), size(stride), size(channels), size(count)]
        case let .channelDotParts(partials, a, b, stride, channels, count, parts):
            return [.pointer(partials), .pointer(a), .pointer(b), size(stride), size(channels), size(count), size(parts)]
        case let .sumParts(out, partials, s, channels, parts):
            return [.pointer(out), .pointer(partials), .float(s), size(channels), size(parts)]
        case let .transpose(out, input, batch, rows, columns, inner):
            return [.pointer(out), .pointer(input), size(batch), size(rows), size(columns), size(inner)]
        case let .columnCopy(out, input, rows, width, outColumns, outFirst, inColumns, inFirst):
            return [.pointer(out), .pointer(input), size(rows), size(width), size(outColumns), size(outFirst),
                    size(inColumns), size(inFirst)]
        }
    }
}
