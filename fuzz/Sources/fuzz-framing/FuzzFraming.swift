import FuzzSupport
import LycorisRPC

/// The message framing and the JSON-RPC layer on an arbitrary byte stream: the reader splits it
/// into NDJSON and Content-Length messages (a small size limit, so the oversized-message paths
/// run too), each is decoded and dispatched to a handler that echoes its params or fails, and
/// each response must decode again as JSON.
nonisolated(unsafe) private let scratch = ScratchFile()

private func handler(method: String, params: JSONValue?) throws -> JSONValue {
    switch method {
    case "fail": throw RPCError.invalidParams("failing on request", path: "params")
    case "throw": throw ScratchError()
    default: return ["method": .string(method), "params": params ?? .null]
    }
}

private struct ScratchError: Error {}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFraming(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    scratch.store(UnsafeRawBufferPointer(start: data, count: size))
    let reader = MessageReader(fileDescriptor: scratch.descriptor, maximumMessageSize: 256)
    var messages = 0
    while let framed = reader.next() {
        messages += 1
        precondition(messages <= size + 1, "the reader returned more messages than there are bytes")
        switch framed {
        case let .message(body, _):
            if let response = JSONRPCDispatcher.process(body, handler: handler) {
                do {
                    _ = try JanssonCodec.decode(response)
                } catch {
                    preconditionFailure("a response is not valid JSON: \(error)")
                }
            }
        case let .malformed(reason, _):
            _ = JanssonCodec.encode(JSONRPCDispatcher.errorResponse(id: .null, .parseError(reason)))
        }
    }
    return 0
}
