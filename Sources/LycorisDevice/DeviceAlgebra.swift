import LycorisAlgorithms

/// The algorithms' ``WeightAlgebra`` on device memory: products by the runtime's SGEMM
/// (cuBLAS semantics, column-major: a row-major C = op(A)·op(B) is the column-major
/// Cᵀ = op(B)ᵀ·op(A)ᵀ, one call with the operands swapped), the rest by the kernels of
/// lycoris_kernels.cu; results in ``DeviceWorkspace`` buffers.
///
/// Operations cannot throw (the protocol's contract): the first failure is kept in
/// ``failure``, every later operation does nothing and returns a value of the right shape at
/// address 0, and ``DeviceAdapterMath`` throws the failure when the algorithm returns —
/// before anything is copied to the caller's buffers.
final class DeviceAlgebra: WeightAlgebra {
    let runtime: DeviceRuntime
    let workspace: DeviceWorkspace
    private(set) var failure: Error?

    init(workspace: DeviceWorkspace) {
        self.runtime = workspace.runtime
        self.workspace = workspace
    }

    /// Throws the first failure of the operations so far.
    func check() throws { if let failure { throw failure } }

    /// A new workspace tensor of `shape` filled by `body`, or the placeholder after a failure.
    private func output(_ shape: [Int], _ body: (DeviceTensor) throws -> Void) -> DeviceTensor {
        guard failure == nil else { return DeviceTensor(address: 0, shape: shape) }
        do {
            let tensor = DeviceTensor(address: try workspace.buffer(shape.reduce(1, *)), shape: shape)
            try body(tensor)
            return tensor
        } catch {
            failure = error
            return DeviceTensor(address: 0, shape: shape)
        }
    }

    private func fail(_ message: String, shape: [Int]) -> DeviceTensor {
        if failure == nil { failure = DeviceRuntimeError(message) }
        return DeviceTensor(address: 0, shape: shape)
    }

    func shape(of value: DeviceTensor) -> [Int] { value.shape }

    func reshaped(_ value: DeviceTensor, _ shape: [Int]) -> DeviceTensor {
        DeviceTensor(address: value.address, shape: shape)
    }

    func matmul(_ a: DeviceTensor, transposeA: Bool, _ b: DeviceTensor, transposeB: Bool, alpha: Float) -> DeviceTensor {
        let (m, k) = transposeA ? (a.shape[1], a.shape[0]) : (a.shape[0], a.shape[1])
        let (kB, n) = transposeB ? (b.shape[1], b.shape[0]) : (b.shape[0], b.shape[1])
        guard a.shape.count == 2, b.shape.count == 2, k == kB else {
            return fail("device matmul: inner dimensions differ, \(a.shape)\(transposeA ? "ᵀ" : "") · \(b.shape)\(transposeB ? "ᵀ" : "")",
                        shape: [m, n])
        }
        return output([m, n]) { c in
            guard k > 0 else { return try runtime.fillZero(c.address, count: m * n) }
            try runtime.sgemm(transposeA: transposeB, transposeB: transposeA, m: n, n: m, k: k, alpha: alpha,
                              a: b.address, lda: b.shape[1], b: a.address, ldb: a.shape[1], beta: 0, c: c.address, ldc: n)
        }
    }

    func swappingMiddleAxes(_ value: DeviceTensor, _ shape: [Int]) -> DeviceTensor {
        output([shape[0], shape[2], shape[1], shape[3]]) { out in
            try runtime.launch(.transpose(out: out.address, input: value.address, batch: shape[0], rows: shape[1],
                                          columns: shape[2], inner: shape[3]))
        }
    }

    func scaled(_ value: DeviceTensor, by s: Float) -> DeviceTensor {
        if s == 1 { return value }
        return output(value.shape) { out in try runtime.launch(.scale(out: out.address, x: value.address, s: s, count: value.count)) }
    }

    func hadamard(_ a: DeviceTensor, _ b: DeviceTensor, scale s: Float) -> DeviceTensor {
        guard a.count == b.count else { return fail("device hadamard: \(a.shape) and \(b.shape) differ", shape: a.shape) }
        return output(a.shape) { out in
            try runtime.launch(.hadamard(out: out.address, a: a.address, b: b.address, s: s, count: a.count))
        }
    }

    func adding(_ a: DeviceTensor, _ b: DeviceTensor) -> DeviceTensor {
        guard a.count == b.count else { return fail("device add: \(a.shape) and \(b.shape) differ", shape: a.shape) }
        return output(b.shape) { out in try runtime.launch(.add(out: out.address, a: a.address, b: b.address, s: 1, count: a.count)) }
    }

    func kronecker(_ a: DeviceTensor, _ b: DeviceTensor, scale s: Float) -> DeviceTensor {
        let (p, q, r, t) = (a.shape[0], a.shape[1], b.shape[0], b.shape[1])
        let kernel = Array(b.shape.dropFirst(2))
        return output([p * r, q * t] + kernel) { out in
            try runtime.launch(.kronecker(out: out.address, a: a.address, b: b.address, s: s, p: p, q: q, r: r, t: t,
                                          k: kernel.reduce(1, *)))
        }
    }

    /// G viewed as (p, r, q, t·k) with its middle axes swapped is (p·q, r·t·k): one row per
    /// element of A, laid out like B, so ∂A = s·blocks·vec(B) and ∂B = s·vec(A)ᵀ·blocks.
    func kroneckerBackward(_ gradient: DeviceTensor, _ a: DeviceTensor, _ b: DeviceTensor,
                           scale s: Float) -> (a: DeviceTensor, b: DeviceTensor) {
        let (p, q, r) = (a.shape[0], a.shape[1], b.shape[0])
        let inner = b.count / r
        let blocks = reshaped(swappingMiddleAxes(gradient, [p, r, q, inner]), [p * q, r * inner])
        let gradA = matmul(blocks, transposeA: false, reshaped(b, [r * inner, 1]), transposeB: false, alpha: s)
        let gradB = matmul(reshaped(a, [1, p * q]), transposeA: false, blocks, transposeB: false, alpha: s)
        return (reshaped(gradA, a.shape), reshaped(gradB, b.shape))
    }

    func dot(_ a: DeviceTensor, _ b: DeviceTensor, scale s: Float) -> DeviceTensor {
        guard a.count == b.count else { return fail("device dot: \(a.shape) and \(b.shape) differ", shape: []) }
        return output([]) { out in try channelDot(into: out, a, b, scale: s, stride: 1, channels: 1) }
    }

    /// out[c] = s · Σ a ⊙ b over channel c (⌊e / stride⌋ mod channels = c), in double: each
    /// channel split into parts summed by their own threads (up to 2¹⁶ threads in all), then
    /// the parts added.
    func channelDot(into out: DeviceTensor, _ a: DeviceTensor, _ b: DeviceTensor, scale s: Float, stride: Int,
                    channels: Int) throws {
        let runs = a.count / (stride * channels)
        let parts = max(1, min(runs, (1 << 16) / channels))
        let partials = try workspace.buffer(2 * channels * parts)
        try runtime.launch(.channelDotParts(partials: partials, a: a.address, b: b.address, stride: stride, channels: channels,
                                            count: a.count, parts: parts))
        try runtime.launch(.sumParts(out: out.address, partials: partials, s: s, channels: channels, parts: parts))
    }

    func scalar(_ value: DeviceTensor) -> Float {
        guard failure == nil else { return 0 }
        do { return try runtime.read(value.address, count: 1)[0] } catch {
            failure = error
            return 0
        }
    }

    func rows(_ value: DeviceTensor, _ range: Range<Int>) -> DeviceTensor {
        let inner = value.shape.dropFirst().reduce(1, *)
        return DeviceTensor(address: value.address + UInt64(range.lowerBound * inner * 4),
                            shape: [range.count] + value.shape.dropFirst())
    }

    func columns(_ value: DeviceTensor, _ range: Range<Int>) -> DeviceTensor {
        let (rows, width) = (value.shape[0], value.shape[1])
        return output([rows, range.count]) { out in
            try runtime.launch(.columnCopy(out: out.address, input: value.address, rows: rows, width: range.count,
                                           outColumns: range.count, outFirst: 0, inColumns: width, inFirst: range.lowerBound))
        }
    }

    func placing(_ block: DeviceTensor, columns range: Range<Int>, width: Int) -> DeviceTensor {
        let rows = block.shape[0]
        return output([rows, width]) { out in
            try runtime.fillZero(out.address, count: rows * width)
            try runtime.launch(.columnCopy(out: out.address, input: block.address, rows: rows, width: range.count,
                                           outColumns: width, outFirst: range.lowerBound, inColumns: range.count, inFirst: 0))
        }
    }
}
