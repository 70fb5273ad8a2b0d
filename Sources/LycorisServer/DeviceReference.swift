import Foundation
import LycorisCUDA
import LycorisRPC

/// A device tensor reference on the wire (protocol/README.md §5.3): a float32 tensor in the
/// client's device memory, named by the IPC handle of the allocation that holds it and the
/// byte offset of its first element:
///
///     {"dtype": "F32", "shape": [320, 4], "cuda_ipc": {"handle": "<base64, 64 bytes>", "offset": 1048576}}
///
/// Parsing checks the form (-32602), the dtype (-32003) and the alignment (-32009); the
/// allocation's bounds are checked when the handle is resolved (``DeviceAddressResolver``).
struct DeviceReference: Equatable {
    let handle: IPCHandle
    let offset: Int
    let shape: [Int]

    var count: Int { shape.reduce(1, *) }

    init(_ value: JSONValue, path: String) throws {
        let p = try Params(value, path: path)
        let dtype = try p.string("dtype")
        guard dtype == "F32" else {
            throw RPCError.dtypeMismatch("\(p.at("dtype")) is \"\(dtype)\"; device tensors are F32", path: p.at("dtype"))
        }
        shape = try p.ints("shape")
        var count = 1
        for extent in shape {
            guard extent >= 0 else { throw RPCError.invalidParams("\(p.at("shape")) has a negative extent", path: p.at("shape")) }
            let (product, overflow) = count.multipliedReportingOverflow(by: extent)
            guard !overflow, product <= Int.max / 4 else { throw RPCError.invalidParams("\(p.at("shape")) is too large", path: p.at("shape")) }
            count = product
        }
        let ipc = try p.object("cuda_ipc")
        handle = try Self.handle(try ipc.string("handle"), path: ipc.at("handle"))
        offset = try ipc.int("offset")
        guard offset >= 0, offset % 4 == 0 else {
            throw RPCError.device("\(ipc.at("offset")) is \(offset); it must be a non-negative multiple of 4 (F32)", path: ipc.at("offset"))
        }
    }

    /// The handle as the wire spells it (standard base64).
    static func handle(_ text: String, path: String) throws -> IPCHandle {
        guard let bytes = Data(base64Encoded: text) else { throw RPCError.invalidParams("\(path) is not valid base64", path: path) }
        do {
            return try IPCHandle(bytes: Array(bytes))
        } catch {
            throw RPCError.invalidParams("\(path): \(error)", path: path)
        }
    }
}

/// How a device network turns handles into addresses: an ``IPCHandleCache`` over the
/// driver's IPC (CUDA) or over mapped files (the emulated device).
protocol DeviceAddressResolver: AnyObject {
    var openCount: Int { get }
    func address(of handle: IPCHandle, offset: Int, bytes: Int) throws(CUDAError) -> UInt64
    func release(_ handle: IPCHandle) throws(CUDAError)
    func releaseAll() throws(CUDAError)
}

extension IPCHandleCache: DeviceAddressResolver {}
