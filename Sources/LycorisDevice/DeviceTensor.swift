/// A float32 tensor in a device's memory: contiguous, row-major, `shape.product` elements from
/// `address` (a CUDA device pointer; for ``EmulatedDevice``, a host pointer). The memory
/// belongs to whoever allocated it (torch's tensors shared by CUDA IPC, the server's workspace).
public struct DeviceTensor: Sendable, Equatable {
    public var address: UInt64
    public var shape: [Int]

    public init(address: UInt64, shape: [Int]) {
        self.address = address
        self.shape = shape
    }

    public var count: Int { shape.reduce(1, *) }
}
