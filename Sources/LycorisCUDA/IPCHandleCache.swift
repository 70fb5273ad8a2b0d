/// The server's mappings of client GPU allocations shared by CUDA IPC (issue 8, zero-copy
/// transport; not yet wired to any method).
///
/// torch's `tensor.untyped_storage()._share_cuda_()` names a tensor's storage by the 64-byte
/// `cudaIpcMemHandle_t` of the whole *allocation* that holds it plus the storage's byte
/// offset inside it. Opening a handle (`cuIpcOpenMemHandle`) costs milliseconds and torch's
/// caching allocator carves many tensors out of one allocation, so each handle is opened
/// once and its mapping kept: a tensor is then `base + offset`, bounds-checked against the
/// allocation's size (`cuMemGetAddressRange`). A mapping is closed (`cuIpcCloseMemHandle`)
/// when the client releases the handle or the server shuts down — in both cases before torch
/// may free the allocation, which its IPC ref-counter holds until then.
///
/// The device calls go through ``IPCMemory`` so the cache and its error paths are tested with
/// a fake device; the driver-backed ``IPCMemory`` is not written yet.
public final class IPCHandleCache<Memory: IPCMemory> {
    /// One opened allocation: its base device address and size in bytes.
    public struct Mapping: Equatable, Sendable {
        public let address: UInt64
        public let size: Int
        public init(address: UInt64, size: Int) {
            self.address = address
            self.size = size
        }
    }

    public let memory: Memory
    private var mappings: [IPCHandle: Mapping] = [:]

    public init(memory: Memory) { self.memory = memory }

    /// How many allocations are open now.
    public var openCount: Int { mappings.count }

    /// The device address of `bytes` bytes at `offset` in the allocation `handle` names,
    /// opening the handle on first use. A range outside the allocation throws (the mapping
    /// stays open: the handle itself is fine).
    public func address(of handle: IPCHandle, offset: Int, bytes: Int) throws(CUDAError) -> UInt64 {
        let mapping: Mapping
        if let known = mappings[handle] {
            mapping = known
        } else {
            mapping = try memory.open(handle)
            mappings[handle] = mapping
        }
        guard offset >= 0, bytes >= 0, offset <= mapping.size, bytes <= mapping.size - offset else {
            throw .invalidArgument("\(bytes) bytes at offset \(offset) are outside the \(mapping.size)-byte allocation of handle \(handle)")
        }
        return mapping.address + UInt64(offset)
    }

    /// Closes the mapping of `handle` (the client is about to free or has reused the
    /// allocation). Releasing a handle that is not open is a no-op.
    public func release(_ handle: IPCHandle) throws(CUDAError) {
        guard let mapping = mappings.removeValue(forKey: handle) else { return }
        try memory.close(mapping.address)
    }

    /// Closes every mapping (shutdown); returns the first close error after trying them all.
    public func releaseAll() throws(CUDAError) {
        var first: CUDAError?
        for (_, mapping) in mappings {
            do { try memory.close(mapping.address) } catch { first = first ?? error }
        }
        mappings.removeAll()
        if let first { throw first }
    }
}

/// A CUDA IPC memory handle: the 64 opaque bytes of `cudaIpcMemHandle_t`.
public struct IPCHandle: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws(CUDAError) {
        guard bytes.count == 64 else {
            throw .invalidArgument("a CUDA IPC handle has 64 bytes, not \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// The first 8 bytes in hex, enough to tell handles apart in a message.
    public var description: String { bytes.prefix(8).map { String($0, radix: 16).leftPadded(2) }.joined() + "…" }
}

/// Opening and closing IPC allocations on a device (the driver: `cuIpcOpenMemHandle` with
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`, `cuMemGetAddressRange`, `cuIpcCloseMemHandle`).
public protocol IPCMemory {
    func open(_ handle: IPCHandle) throws(CUDAError) -> IPCHandleCache<Self>.Mapping
    func close(_ address: UInt64) throws(CUDAError)
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
