import CLycorisKernelsCPU
import COpenBLAS

/// The test device: ``DeviceRuntime`` on host memory, so everything above it — the algebra,
/// ``DeviceAdapterMath``, the server's device methods, the Python client's device path — runs
/// and is tested without a GPU.
///
/// An address is a host pointer: memory ``allocate(_:)`` returns, or any float32 memory the
/// caller owns (the server passes arena memory). Kernels are lycoris_kernels.cu compiled as C
/// (CLycorisKernelsCPU, every thread of a launch in turn), GEMMs `cblas_sgemm` column-major:
/// the index arithmetic and operand order are the CUDA path's; only the arithmetic's
/// rounding order inside a GEMM differs. Everything runs at once, so nothing is ever queued.
/// One caller at a time.
public final class EmulatedDevice: DeviceRuntime, @unchecked Sendable {
    /// Threads per emulated block: small and odd-sized launches then end in a partial block,
    /// as on a GPU.
    static let block: UInt32 = 128
    private var live: [UInt64: Int] = [:]

    public init() {}

    public var description: String { "emulated" }

    /// The allocations not yet freed (bytes by address): tests check that workspaces give back.
    public var liveAllocations: [UInt64: Int] { live }

    public func allocate(_ count: Int) throws -> UInt64 {
        let bytes = max(1, count) * 4
        let pointer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 256)
        let address = UInt64(UInt(bitPattern: pointer))
        live[address] = bytes
        return address
    }

    public func free(_ address: UInt64) throws {
        guard live.removeValue(forKey: address) != nil else {
            throw DeviceRuntimeError("emulated device: 0x\(String(address, radix: 16)) was not allocated here (or freed twice)")
        }
        UnsafeMutableRawPointer(bitPattern: UInt(address))?.deallocate()
    }

    public func write(_ values: [Float], to address: UInt64) throws {
        let target = try pointer(address)
        values.withUnsafeBufferPointer { target.update(from: $0.baseAddress!, count: values.count) }
    }

    public func read(_ address: UInt64, count: Int) throws -> [Float] {
        let source = try pointer(address)
        return Array(UnsafeBufferPointer(start: source, count: count))
    }

    public func copy(_ count: Int, from source: UInt64, to destination: UInt64) throws {
        try pointer(destination).update(from: try pointer(source), count: count)
    }

    public func fillZero(_ address: UInt64, count: Int) throws {
        try pointer(address).update(repeating: 0, count: count)
    }

    public func launch(_ kernel: DeviceKernel) throws {
        let count = kernel.threads
        guard count > 0 else { return }
        let block = Self.block
        let grid = UInt32((count + Int(block) - 1) / Int(block))
        func p(_ address: UInt64) throws -> UnsafeMutablePointer<Float> { try pointer(address) }
        func u(_ value: Int) -> UInt64 { UInt64(value) }
        func doubles(_ address: UInt64) throws -> UnsafeMutablePointer<Double> {
            UnsafeMutableRawPointer(try pointer(address)).assumingMemoryBound(to: Double.self)
        }
        switch kernel {
        case let .scale(out, x, s, n):
            lycoris_cpu_scale(grid, block, try p(out), try p(x), s, u(n))
        case let .hadamard(out, a, b, s, n):
            lycoris_cpu_hadamard(grid, block, try p(out), try p(a), try p(b), s, u(n))
        case let .add(out, a, b, s, n):
            lycoris_cpu_add(grid, block, try p(out), try p(a), try p(b), s, u(n))
        case let .kronecker(out, a, b, s, pp, q, r, t, k):
            lycoris_cpu_kronecker(grid, block, try p(out), try p(a), try p(b), s, u(pp), u(q), u(r), u(t), u(k))
        case let .channelScale(out, x, w, offset, s, stride, channels, n):
            lycoris_cpu_channel_scale(grid, block, try p(out), try p(x), try p(w), offset, s, u(stride), u(channels), u(n))
        case let .channelDotParts(partials, a, b, stride, channels, n, parts):
            lycoris_cpu_channel_dot_parts(grid, block, try doubles(partials), try p(a), try p(b), u(stride), u(channels), u(n), u(parts))
        case let .sumParts(out, partials, s, channels, parts):
            lycoris_cpu_sum_parts(grid, block, try p(out), try doubles(partials), s, u(channels), u(parts))
        case let .transpose(out, input, batch, rows, columns, inner):
            lycoris_cpu_transpose(grid, block, try p(out), try p(input), u(batch), u(rows), u(columns), u(inner))
        case let .columnCopy(out, input, rows, width, outColumns, outFirst, inColumns, inFirst):
            lycoris_cpu_column_copy(grid, block, try p(out), try p(input), u(rows), u(width), u(outColumns), u(outFirst),
                                    u(inColumns), u(inFirst))
        }
    }

    public func sgemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int,
                      b: UInt64, ldb: Int, beta: Float, c: UInt64, ldc: Int) throws {
        guard m > 0, n > 0 else { return }
        let output = try pointer(c)
        if k == 0 {
            for column in 0..<n { for row in 0..<m { output[column * ldc + row] *= beta } }
            return
        }
        cblas_sgemm(CblasColMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, try pointer(a), Int32(lda), try pointer(b), Int32(ldb), beta,
                    output, Int32(ldc))
    }

    public func synchronize() throws {}

    private func pointer(_ address: UInt64) throws -> UnsafeMutablePointer<Float> {
        guard let pointer = UnsafeMutablePointer<Float>(bitPattern: UInt(address)) else {
            throw DeviceRuntimeError("emulated device: null address")
        }
        return pointer
    }
}
