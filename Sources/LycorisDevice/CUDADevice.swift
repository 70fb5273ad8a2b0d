import LycorisCUDA

/// ``DeviceRuntime`` on one GPU: the primary context of device N (the one torch uses), one
/// stream every operation is queued on, the kernels of lycoris_kernels.cu compiled by NVRTC
/// for the device's compute capability at creation (once), and cuBLAS on that stream in its
/// default math mode (TF32 off, so products match float32 on the CPU to rounding).
///
/// The context is made current on the calling thread by every method (the driver's current
/// context is per thread, and a server may call from more than one). One caller at a time.
///
/// NOT YET RUN ON A GPU: nothing here has executed; on a machine without a driver its
/// creation fails with the driver's not-found error (tested), and scripts/gpu-check.sh runs
/// ``DeviceSelfCheck`` on it first thing on a GPU host.
public final class CUDADevice: DeviceRuntime, @unchecked Sendable {
    public let context: CUDAContext
    public let deviceName: String
    private let blas: CUBLASHandle
    private let stream: OpaquePointer?
    private let functions: [String: OpaquePointer?]

    /// Compiles and loads the kernels on device `device` of `driver`, with a stream and a cuBLAS handle.
    public init(driver: CUDADriver, nvrtc: NVRTC, cublas: CUBLAS, device: Int) throws(CUDAError) {
        guard driver.devices.indices.contains(device) else {
            throw .invalidArgument("cuda:\(device): the CUDA driver lists \(driver.devices.count) device(s)")
        }
        let capability = driver.devices[device].computeCapability
        let ptx = try nvrtc.compile(KernelSource.text, name: "lycoris_kernels.cu",
                                    options: ["--gpu-architecture=compute_\(capability.major)\(capability.minor)"])
        context = try CUDAContext(driver: driver, device: device)
        deviceName = driver.devices[device].name
        let module = try context.module(ptx: ptx)
        var functions: [String: OpaquePointer?] = [:]
        for name in DeviceKernel.names { functions[name] = try context.function(name, in: module) }
        self.functions = functions
        stream = try context.makeStream()
        blas = try CUBLASHandle(cublas)
        try blas.use(stream: stream)
    }

    /// The device `device` of a probed environment; throws the first reason it cannot be used.
    public convenience init(environment: CUDAEnvironment, device: Int) throws(CUDAError) {
        let driver = try environment.driver.get()
        try self.init(driver: driver, nvrtc: try environment.nvrtc.get(), cublas: try environment.cublas.get(), device: device)
    }

    public var description: String { "cuda:\(context.device) \(deviceName)" }

    public func allocate(_ count: Int) throws -> UInt64 {
        try context.makeCurrent()
        return try context.allocate(count)
    }

    public func free(_ address: UInt64) throws {
        try context.makeCurrent()
        try context.free(address)
    }

    public func write(_ values: [Float], to address: UInt64) throws {
        try synchronize()
        try context.write(values, to: address)
    }

    public func read(_ address: UInt64, count: Int) throws -> [Float] {
        try synchronize()
        return try context.read(address, count: count)
    }

    public func copy(_ count: Int, from source: UInt64, to destination: UInt64) throws {
        try context.makeCurrent()
        try context.copy(count, from: source, to: destination, stream: stream)
    }

    public func fillZero(_ address: UInt64, count: Int) throws {
        try context.makeCurrent()
        try context.fillZero(address, count: count, stream: stream)
    }

    public func launch(_ kernel: DeviceKernel) throws {
        try context.makeCurrent()
        guard let function = functions[kernel.name] else { throw CUDAError.invalidArgument("no kernel \(kernel.name) loaded") }
        try context.launch(function, count: kernel.threads, stream: stream, kernel.arguments)
    }

    public func sgemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int,
                      b: UInt64, ldb: Int, beta: Float, c: UInt64, ldc: Int) throws {
        try context.makeCurrent()
        try blas.sgemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda,
                       b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
    }

    public func synchronize() throws {
        try context.makeCurrent()
        try context.synchronize(stream: stream)
    }
}
