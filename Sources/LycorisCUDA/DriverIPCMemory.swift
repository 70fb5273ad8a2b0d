import CCUDAIPC

/// ``IPCMemory`` through the CUDA driver: the allocations of another process (torch's,
/// shared by `untyped_storage()._share_cuda_()`) mapped into this one. Declared from NVIDIA's
/// documented C API (`CUresult` 0 = success):
///
///     cuIpcOpenMemHandle_v2(CUdeviceptr *base, CUipcMemHandle handle, unsigned flags)
///         handle: 64 bytes BY VALUE (called through CCUDAIPC's C trampoline);
///         flags = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS (1)
///     cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr address)
///     cuIpcCloseMemHandle(CUdeviceptr base)
///
/// The calls act in the context current on the calling thread: create the ``CUDAContext``
/// of the device the handles belong to first (its init makes the device's primary context
/// current). A process cannot open its own allocations' handles (CUDA refuses), so this is
/// only exercised across processes.
///
/// NOT YET RUN ON A GPU: written from the documentation; python/tests/test_cuda_device.py
/// exercises it through the server where a GPU is lent (scripts/gpu-check.sh).
public final class DriverIPCMemory: IPCMemory {
    public let driver: CUDADriver
    private let openFunction: UnsafeMutableRawPointer
    private let addressRange: @convention(c) (UnsafeMutablePointer<UInt64>, UnsafeMutablePointer<Int>, UInt64) -> Int32
    private let closeFunction: @convention(c) (UInt64) -> Int32

    /// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`: the mapping is usable from peer devices too.
    static let lazyEnablePeerAccess: UInt32 = 1

    public init(driver: CUDADriver) throws(CUDAError) {
        self.driver = driver
        // cuda.h maps cuIpcOpenMemHandle to the _v2 entry point; older drivers have only the first.
        typealias Entry = @convention(c) () -> Void
        let entry: Entry
        do {
            entry = try driver.library.function("cuIpcOpenMemHandle_v2", as: Entry.self)
        } catch {
            entry = try driver.library.function("cuIpcOpenMemHandle", as: Entry.self)
        }
        openFunction = unsafeBitCast(entry, to: UnsafeMutableRawPointer.self)
        addressRange = try driver.library.function("cuMemGetAddressRange_v2", as: type(of: addressRange))
        closeFunction = try driver.library.function("cuIpcCloseMemHandle", as: type(of: closeFunction))
    }

    public func open(_ handle: IPCHandle) throws(CUDAError) -> IPCHandleCache<DriverIPCMemory>.Mapping {
        var base: UInt64 = 0
        let opened = handle.bytes.withUnsafeBufferPointer { bytes in
            ccuda_ipc_open(openFunction, &base, bytes.baseAddress, Self.lazyEnablePeerAccess)
        }
        try driver.check("cuIpcOpenMemHandle(\(handle))", opened)
        var start: UInt64 = 0
        var size = 0
        let ranged = addressRange(&start, &size, base)
        if ranged != 0 {
            _ = closeFunction(base)
            try driver.check("cuMemGetAddressRange", ranged)
        }
        return .init(address: base, size: size)
    }

    public func close(_ address: UInt64) throws(CUDAError) {
        try driver.check("cuIpcCloseMemHandle", closeFunction(address))
    }
}
