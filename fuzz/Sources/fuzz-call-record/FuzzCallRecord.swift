import FuzzSupport
import LycorisRPC
import LycorisServer

/// Binary call records (protocol/README.md §2.1) on an initialised server with one LoRA
/// module (linear 16→24, handle 0) and a 64 KiB arena. An input is a byte stream split by
/// `MessageReader` (records of any header, cut short or over its limit, JSON between them);
/// each record goes to `handleRecord`, whose answer must be a well-formed response record:
/// magic, version 1, its length field equal to its size, status 0 or 1, and for status 1 the
/// JSON error object its body announces.
nonisolated(unsafe) private let scratch = ScratchFile()

private let network = try! JanssonCodec.decode(Array("""
    {"algo":"lora","options":{"lora_dim":2,"alpha":1.0},\
    "layers":[{"name":"m","kind":"linear","in_features":16,"out_features":24}]}
    """.utf8))

private func checkResponse(_ response: [UInt8]) {
    var reader = CallRecordReader(response)
    do {
        let magic = try reader.u8("magic"), version = try reader.u8("version")
        precondition(magic == CallRecord.magic && version == CallRecord.version, "bad response header")
        let status = try reader.u16("status")
        let length = try reader.u32("length")
        precondition(Int(length) == response.count, "the response's length field is not its size")
        _ = try reader.u64("id")
        switch status {
        case CallRecord.Status.ok.rawValue: break
        case CallRecord.Status.error.rawValue:
            let code = Int32(bitPattern: try reader.u32("code"))
            let jsonLength = Int(try reader.u32("json_length"))
            precondition(jsonLength == response.count - reader.position, "the error's JSON length is not what follows")
            let error = try JanssonCodec.decode(Array(response[reader.position...]))
            precondition(error["code"]?.intValue == Int(code), "the error record's code differs from its JSON")
        default: preconditionFailure("response status \(status)")
        }
    } catch {
        preconditionFailure("a malformed response record: \(error)")
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzCallRecord(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    scratch.store(UnsafeRawBufferPointer(start: data, count: size))
    let service = LycorisService()
    do {
        _ = try service.handle(method: "initialize", params: .object(JSONObject()))
        _ = try service.handle(method: "arena.create", params: ["size": 65536])
        _ = try service.handle(method: "network.create", params: network)
    } catch {
        preconditionFailure("setting up the server failed: \(error)")
    }
    let reader = MessageReader(fileDescriptor: scratch.descriptor, maximumMessageSize: 1 << 16)
    var messages = 0
    while let framed = reader.next() {
        messages += 1
        precondition(messages <= size + 1, "the reader returned more messages than there are bytes")
        switch framed {
        case let .message(body, .record):
            // (tapes.release records are never answered.)
            if let response = service.handleRecord(body) { checkResponse(response) }
        case let .malformed(reason, .record): checkResponse(CallRecordWriter.error(id: 0, .parseError(reason)))
        default: continue
        }
    }
    // Nothing outlives the input, so LeakSanitizer's per-input check sees every allocation.
    service.releaseAll()
    return 0
}
