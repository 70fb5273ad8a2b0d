/// Device memory, kernel modules and launches in the primary context of one device, through
/// the driver API (declared from NVIDIA's documented C API; `CUresult` 0 = success). The
/// primary context is the one the CUDA runtime — and so torch — uses on that device.
///
///     cuDevicePrimaryCtxRetain(CUcontext *, CUdevice) / cuCtxSetCurrent(CUcontext)
///     cuModuleLoadData(CUmodule *, const void *ptx) / cuModuleGetFunction(CUfunction *, CUmodule, const char *)
///     cuMemAlloc_v2(CUdeviceptr *, size_t) / cuMemFree_v2(CUdeviceptr)
///     cuMemcpyHtoD_v2(CUdeviceptr, const void *, size_t) / cuMemcpyDtoH_v2(void *, CUdeviceptr, size_t)
///     cuLaunchKernel(CUfunction, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedBytes,
///                    CUstream, void **parameters, void **extra)
///     cuCtxSynchronize()
///
/// NOT YET RUN ON A GPU: the server's CUDA probe runs ``CUDAKernelCheck`` through it where a
/// device is available (scripts/gpu-check.sh, python/tests/test_cuda_probe.py).
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

    /// Retains device `device`'s primary context and makes it current on this thread.
    public init(driver: CUDADriver, device: Int) throws(CUDAError) {
        self.driver = driver
        self.device = device
        let library = driver.library
        let deviceGet = try library.function("cuDeviceGet",
            as: (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32).self)
        let retain = try library.function("cuDevicePrimaryCtxRetain",
            as: (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> Int32).self)
        let setCurrent = try library.function("cuCtxSetCurrent", as: (@convention(c) (OpaquePointer?) -> Int32).self)
        memAlloc = try library.function("cuMemAlloc_v2", as: type(of: memAlloc))
        memFree = try library.function("cuMemFree_v2", as: type(of: memFree))
        copyToDevice = try library.function("cuMemcpyHtoD_v2", as: type(of: copyToDevice))
        copyToHost = try library.function("cuMemcpyDtoH_v2", as: type(of: copyToHost))
        moduleLoad = try library.function("cuModuleLoadData", as: type(of: moduleLoad))
        moduleFunction = try library.function("cuModuleGetFunction", as: type(of: moduleFunction))
        launchKernel = try library.function("cuLaunchKernel", as: type(of: launchKernel))
        synchronizeCall = try library.function("cuCtxSynchronize", as: type(of: synchronizeCall))
        var handle: Int32 = 0
        var context: OpaquePointer?
        try driver.check("cuDeviceGet", deviceGet(&handle, Int32(device)))
        try driver.check("cuDevicePrimaryCtxRetain", retain(&context, handle))
        try driver.check("cuCtxSetCurrent", setCurrent(context))
    }

    /// The function `name` of a module loaded from `ptx` (the driver JITs it for the device).
    public func function(_ name: String, ptx: String) throws(CUDAError) -> OpaquePointer? {
        var module: OpaquePointer?
        var function: OpaquePointer?
        let loaded = ptx.withCString { moduleLoad(&module, UnsafeRawPointer($0)) }
        try driver.check("cuModuleLoadData", loaded)
        try driver.check("cuModuleGetFunction(\(name))", moduleFunction(&function, module, name))
        return function
    }

    /// `count` floats of device memory, filled from `values` when given.
    public func allocate(_ count: Int, from values: [Float]? = nil) throws(CUDAError) -> UInt64 {
        var address: UInt64 = 0
        try driver.check("cuMemAlloc_v2", memAlloc(&address, max(1, count) * 4))
        if let values {
            precondition(values.count == count)
            let status = values.withUnsafeBytes { copyToDevice(address, $0.baseAddress!, $0.count) }
            try driver.check("cuMemcpyHtoD_v2", status)
        }
        return address
    }

    public func free(_ address: UInt64) throws(CUDAError) { try driver.check("cuMemFree_v2", memFree(address)) }

    /// `count` floats copied back from `address`.
    public func read(_ address: UInt64, count: Int) throws(CUDAError) -> [Float] {
        var values = [Float](repeating: 0, count: count)
        let status = values.withUnsafeMutableBytes { copyToHost($0.baseAddress!, address, $0.count) }
        try driver.check("cuMemcpyDtoH_v2", status)
        return values
    }

    /// function<<<⌈count / block⌉, block>>>(arguments…) on the default stream, then waits for it.
    public func launch(_ function: OpaquePointer?, count: Int, block: Int = 128, _ arguments: [Argument]) throws(CUDAError) {
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
            launchKernel(function, grid, 1, 1, UInt32(block), 1, 1, 0, nil, $0.baseAddress, nil)
        }
        try driver.check("cuLaunchKernel", status)
        try synchronize()
    }

    /// Waits for every queued operation of the context.
    public func synchronize() throws(CUDAError) { try driver.check("cuCtxSynchronize", synchronizeCall()) }
}
