/// Device memory, kernel modules and launches in the primary context of one device, through
/// the driver API (declared from NVIDIA's documented C API; `CUresult` 0 = success). The
/// primary context is the one the CUDA runtime — and so torch — uses on that device.
///
///     cuDevicePrimaryCtxRetain(CUcontext *, CUdevice) / cuCtxSetCurrent(CUcontext)
///     cuModuleLoadData(CUmodule *, const void *ptx) / cuModuleGetFunction(CUfunction *, CUmodule, const char *)
///     cuMemAlloc_v2(CUdeviceptr *, size_t) / cuMemFree_v2(CUdeviceptr)
///     cuMemcpyHtoD_v2(CUdeviceptr, const void *, size_t) / cuMemcpyDtoH_v2(void *, CUdeviceptr, size_t)
///     cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t, CUstream)
///     cuMemsetD32Async(CUdeviceptr, unsigned int value, size_t count, CUstream)
///     cuStreamCreate(CUstream *, unsigned flags) / cuStreamSynchronize(CUstream)
///     cuLaunchKernel(CUfunction, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedBytes,
///                    CUstream, void **parameters, void **extra)
///     cuCtxSynchronize()
///
/// Launches, device-to-device copies and fills are queued on the stream given (nil: the
/// default stream) and return at once; ``synchronize()`` or ``synchronize(stream:)`` waits.
///
/// NOT YET RUN ON A GPU: the server's CUDA probe runs ``CUDAKernelCheck`` through it where a
/// device is available (scripts/gpu-check.sh, python/tests/test_cuda_probe.py), and
/// LycorisDevice's `CUDADevice` computes through it.
public final class CUDAContext: @unchecked Sendable {
    /// A kernel argument as `cuLaunchKernel` reads it (each by address).
    public enum Argument {
        case pointer(UInt64)
        case float(Float)
        case u64(UInt64)
        case double(Double)
    }

    public let driver: CUDADriver
    public let device: Int

    private let memAlloc: @convention(c) (UnsafeMutablePointer<UInt64>, Int) -> Int32
    private let memFree: @convention(c) (UInt64) -> Int32
    private let copyToDevice: @convention(c) (UInt64, UnsafeRawPointer, Int) -> Int32
    private let copyToHost: @convention(c) (UnsafeMutableRawPointer, UInt64, Int) -> Int32
    private let moduleLoad: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> Int32
    private let moduleFunction: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> Int32
    private let launchKernel: @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32,
                                              OpaquePointer?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                                              UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32
    private let synchronizeCall: @convention(c) () -> Int32
    private let copyOnDevice: @convention(c) (UInt64, UInt64, Int, OpaquePointer?) -> Int32
    private let fill32: @convention(c) (UInt64, UInt32, Int, OpaquePointer?) -> Int32
    private let streamCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Int32
    private let streamSynchronize: @convention(c) (OpaquePointer?) -> Int32
    private let setCurrent: @convention(c) (OpaquePointer?) -> Int32
    private let context: OpaquePointer?

    /// Retains device `device`'s primary context and makes it current on this thread.
    public init(driver: CUDADriver, device: Int) throws(CUDAError) {
        self.driver = driver
        self.device = device
        let library = driver.library
        let deviceGet = try library.function("cuDeviceGet",
            as: (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32).self)
        let retain = try library.function("cuDevicePrimaryCtxRetain",
            as: (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> Int32).self)
        setCurrent = try library.function("cuCtxSetCurrent", as: type(of: setCurrent))
        memAlloc = try library.function("cuMemAlloc_v2", as: type(of: memAlloc))
        memFree = try library.function("cuMemFree_v2", as: type(of: memFree))
        copyToDevice = try library.function("cuMemcpyHtoD_v2", as: type(of: copyToDevice))
        copyToHost = try library.function("cuMemcpyDtoH_v2", as: type(of: copyToHost))
        moduleLoad = try library.function("cuModuleLoadData", as: type(of: moduleLoad))
        moduleFunction = try library.function("cuModuleGetFunction", as: type(of: moduleFunction))
        launchKernel = try library.function("cuLaunchKernel", as: type(of: launchKernel))
        synchronizeCall = try library.function("cuCtxSynchronize", as: type(of: synchronizeCall))
        copyOnDevice = try library.function("cuMemcpyDtoDAsync_v2", as: type(of: copyOnDevice))
        fill32 = try library.function("cuMemsetD32Async", as: type(of: fill32))
        streamCreate = try library.function("cuStreamCreate", as: type(of: streamCreate))
        streamSynchronize = try library.function("cuStreamSynchronize", as: type(of: streamSynchronize))
        var handle: Int32 = 0
        var context: OpaquePointer?
        try driver.check("cuDeviceGet", deviceGet(&handle, Int32(device)))
        try driver.check("cuDevicePrimaryCtxRetain", retain(&context, handle))
        self.context = context
        try makeCurrent()
    }

    /// Makes the context current on the calling thread (each thread has its own current context).
    public func makeCurrent() throws(CUDAError) { try driver.check("cuCtxSetCurrent", setCurrent(context)) }

    /// A module loaded from `ptx` (the driver JITs it for the device); it stays loaded.
    public func module(ptx: String) throws(CUDAError) -> OpaquePointer? {
        var module: OpaquePointer?
        let loaded = ptx.withCString { moduleLoad(&module, UnsafeRawPointer($0)) }
        try driver.check("cuModuleLoadData", loaded)
        return module
    }

    /// The kernel `name` of `module`.
    public func function(_ name: String, in module: OpaquePointer?) throws(CUDAError) -> OpaquePointer? {
        var function: OpaquePointer?
        try driver.check("cuModuleGetFunction(\(name))", moduleFunction(&function, module, name))
        return function
    }

    /// A new stream that synchronises with the default stream (flags 0).
    public func makeStream() throws(CUDAError) -> OpaquePointer? {
        var stream: OpaquePointer?
        try driver.check("cuStreamCreate", streamCreate(&stream, 0))
        return stream
    }

    /// `count` floats of device memory, filled from `values` when given.
    public func allocate(_ count: Int, from values: [Float]? = nil) throws(CUDAError) -> UInt64 {
        var address: UInt64 = 0
        try driver.check("cuMemAlloc_v2", memAlloc(&address, max(1, count) * 4))
        if let values {
            precondition(values.count == count)
            try write(values, to: address)
        }
        return address
    }

    public func free(_ address: UInt64) throws(CUDAError) { try driver.check("cuMemFree_v2", memFree(address)) }

    /// `values` copied to `address` (waits until copied).
    public func write(_ values: [Float], to address: UInt64) throws(CUDAError) {
        let status = values.withUnsafeBytes { copyToDevice(address, $0.baseAddress!, $0.count) }
        try driver.check("cuMemcpyHtoD_v2", status)
    }

    /// `count` floats from `source` to `destination`, queued on `stream`.
    public func copy(_ count: Int, from source: UInt64, to destination: UInt64, stream: OpaquePointer?) throws(CUDAError) {
        try driver.check("cuMemcpyDtoDAsync_v2", copyOnDevice(destination, source, count * 4, stream))
    }

    /// `count` floats at `address` set to 0, queued on `stream`.
    public func fillZero(_ address: UInt64, count: Int, stream: OpaquePointer?) throws(CUDAError) {
        try driver.check("cuMemsetD32Async", fill32(address, 0, count, stream))
    }

    /// `count` floats copied back from `address`.
    public func read(_ address: UInt64, count: Int) throws(CUDAError) -> [Float] {
        var values = [Float](repeating: 0, count: count)
        let status = values.withUnsafeMutableBytes { copyToHost($0.baseAddress!, address, $0.count) }
        try driver.check("cuMemcpyDtoH_v2", status)
        return values
    }

    /// function<<<⌈count / block⌉, block>>>(arguments…) queued on `stream` (nil: the default stream).
    public func launch(_ function: OpaquePointer?, count: Int, block: Int = 128, stream: OpaquePointer? = nil,
                       _ arguments: [Argument]) throws(CUDAError) {
        guard count > 0 else { return }
        let boxes = arguments.map { argument -> UnsafeMutableRawPointer in
            let box = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            switch argument {
            case let .pointer(value), let .u64(value): box.storeBytes(of: value, as: UInt64.self)
            case let .float(value): box.storeBytes(of: value, as: Float.self)
            case let .double(value): box.storeBytes(of: value, as: Double.self)
            }
            return box
        }
        defer { boxes.forEach { $0.deallocate() } }
        var parameters: [UnsafeMutableRawPointer?] = boxes
        let grid = UInt32((count + block - 1) / block)
        let status = parameters.withUnsafeMutableBufferPointer {
            launchKernel(function, grid, 1, 1, UInt32(block), 1, 1, 0, stream, $0.baseAddress, nil)
        }
        try driver.check("cuLaunchKernel", status)
    }

    /// Waits for every queued operation of the context.
    public func synchronize() throws(CUDAError) { try driver.check("cuCtxSynchronize", synchronizeCall()) }

    /// Waits for every operation queued on `stream`.
    public func synchronize(stream: OpaquePointer?) throws(CUDAError) {
        try driver.check("cuStreamSynchronize", streamSynchronize(stream))
    }
}
