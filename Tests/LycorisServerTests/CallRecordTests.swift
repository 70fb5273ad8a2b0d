import Foundation
import LycorisCore
import LycorisRPC
import LycorisServer
import LycorisTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The binary call record (protocol/README.md §2.1): the Swift layout against the spec's
/// tables, forward and backward through records against the library's own computation, the
/// reader's record framing, and bad records answered with error records while the service
/// serves on.
@Suite("binary call record")
struct CallRecordTests {
    static let specURL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("protocol/README.md")

    @Test("CallRecord.layouts are the spec's tables, field by field")
    func layoutsAreTheSpec() throws {
        let text = try String(contentsOf: Self.specURL, encoding: .utf8)
        let section = try #require(text.components(separatedBy: "### 2.1 Binary call record").dropFirst().first?
            .components(separatedBy: "\n## 3.").first)
        var tables: [String: [CallRecord.Field]] = [:]
        var part: String?
        for line in section.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("**"), let end = line.dropFirst(2).firstIndex(of: "*") {
                part = String(line[line.index(line.startIndex, offsetBy: 2)..<end])
                continue
            }
            guard let current = part, line.hasPrefix("|") else {
                if !line.isEmpty, !line.hasPrefix("|") { part = nil }
                continue
            }
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 3, Int(cells[0]) != nil else { continue }
            tables[current, default: []].append(CallRecord.Field(cells[1], cells[2]))
        }
        #expect(Set(tables.keys) == Set(CallRecord.layouts.map(\.part)))
        for (name, fields) in CallRecord.layouts {
            #expect(tables[name] == fields, "\(name): spec \(tables[name] ?? []) vs Swift \(fields)")
        }
    }

    /// A harness with the standard network and a 4 KiB arena, mapped here through its file.
    struct Session {
        let harness: ServerHarness
        let oracle: OracleNetwork
        let arena: FileHandle
        var nextID: UInt64 = 1

        init() throws {
            harness = try ServerHarness()
            oracle = try OracleNetwork.create(in: harness)
            let path = try #require(try harness.result("arena.create", ["size": 8192])["path"]?.stringValue)
            arena = try #require(FileHandle(forUpdatingAtPath: path))
        }

        func put(_ tensor: Tensor, at offset: Int) throws {
            try arena.seek(toOffset: UInt64(offset))
            arena.write(Data(try encodeFloats(tensor.scalars, as: .f32)))
        }

        func read(_ shape: [Int], at offset: Int) throws -> Tensor {
            try arena.seek(toOffset: UInt64(offset))
            let data = try #require(try arena.read(upToCount: shape.reduce(1, *) * 4))
            return Tensor(shape: shape, scalars: [UInt8](data).withUnsafeBytes { decodeFloats($0, as: .f32) })
        }

        mutating func send(_ record: [UInt8]) -> (status: UInt16, id: UInt64, body: [UInt8]) {
            let response = serviceLock.withLock { harness.service.handleRecord(record) } ?? []
            var reader = CallRecordReader(response)
            let magic = try? reader.u8("magic"), version = try? reader.u8("version")
            let status = (try? reader.u16("status")) ?? 99
            let length = (try? reader.u32("length")) ?? 0
            let id = (try? reader.u64("id")) ?? 0
            #expect(magic == CallRecord.magic && version == 1 && Int(length) == response.count)
            return (status, id, Array(response.dropFirst(CallRecord.headerSize)))
        }

        /// The error object of an error record.
        mutating func error(_ record: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) throws -> WireError {
            let (status, _, body) = send(record)
            try #require(status == 1, "expected an error record", sourceLocation: sourceLocation)
            let json = try JanssonCodec.decode(Array(body.dropFirst(8)))
            let code = try #require(json["code"]?.intValue)
            var reader = CallRecordReader(body)
            #expect(Int(try reader.u32("code")) == Int(UInt32(bitPattern: Int32(code))), sourceLocation: sourceLocation)
            #expect(Int(try reader.u32("json_length")) == body.count - 8, sourceLocation: sourceLocation)
            return WireError(code: code, message: try #require(json["message"]?.stringValue), data: json["data"])
        }
    }

    static func forward(id: UInt64 = 1, handle: UInt32 = 0, flags: UInt32 = CallRecord.forwardGrad, dtype: UInt8 = 0,
                        shape: [UInt64] = [2, 3, 16], input: UInt64 = 0, output: UInt64 = 2048, method: UInt16 = 1) -> [UInt8] {
        var writer = CallRecordWriter(code: method, id: id)
        writer.u32(handle)
        writer.u32(flags)
        writer.u64(input)
        writer.u8(dtype)
        writer.u8(UInt8(shape.count))
        writer.u16(0)
        for extent in shape { writer.u64(extent) }
        writer.u64(output)
        writer.u8(0)
        writer.append([0, 0, 0])
        return writer.finish()
    }

    static func backward(id: UInt64 = 2, tape: UInt64, flags: UInt32, gradOutput: UInt64 = 4096, gradInput: UInt64 = 5120,
                         parameterGrads: [UInt64], shape: [UInt64] = [2, 3, 24]) -> [UInt8] {
        var writer = CallRecordWriter(code: 2, id: id)
        writer.u64(tape)
        writer.u32(flags)
        writer.u32(UInt32(parameterGrads.count))
        writer.u64(gradOutput)
        writer.u8(0)
        writer.u8(UInt8(shape.count))
        writer.u16(0)
        for extent in shape { writer.u64(extent) }
        for offset in [gradInput] + parameterGrads {
            writer.u64(offset)
            writer.u8(0)
            writer.append([0, 0, 0])
        }
        return writer.finish()
    }

    @Test("forward and backward records compute what the library computes, outputs in the arena")
    func forwardAndBackward() throws {
        var session = try Session()
        let x = randomTensor([2, 3, 16], seed: 5), g = randomTensor([2, 3, 24], seed: 6)
        try session.put(x, at: 0)
        try session.put(g, at: 4096)
        let (status, id, body) = session.send(Self.forward(id: 77))
        #expect(status == 0 && id == 77 && body.count == 8)
        var reader = CallRecordReader(body)
        let tape = try reader.u64("tape")
        #expect(tape > 0)
        expectClose(try session.read([2, 3, 24], at: 2048), try session.oracle.delta("lin", x), "forward record output")

        let parameters = try #require(try session.harness.result("network.info")["modules"]?[0]?["parameters"]?.arrayValue)
        let offsets = (0..<parameters.count).map { UInt64(6144 + 512 * $0) }
        let answer = session.send(Self.backward(tape: tape, flags: CallRecord.backwardParameterGrads, parameterGrads: offsets))
        #expect(answer.status == 0 && answer.id == 2 && answer.body.isEmpty)
        let expected = try session.oracle.backward("lin", x, g)
        expectClose(try session.read([2, 3, 16], at: 5120), expected.input, "backward record ∂x")
        for (parameter, offset) in zip(parameters, offsets) {
            let key = try #require(parameter["key"]?.stringValue)
            let extents = parameter["shape"]?.arrayValue?.compactMap { $0.intValue }
            let shape = try #require(extents)
            expectClose(try session.read(shape, at: Int(offset)), try #require(expected.parameters[key]), "∂\(key)")
        }
        // Without keep the tape is consumed; accumulate was off: no gradients kept.
        let again = try session.error(Self.backward(tape: tape, flags: 0, parameterGrads: []))
        expectError(again, code: -32001, "Unknown tape: \(tape)")
    }

    @Test("bad records: an error record naming the problem, then the service serves on", arguments: [
        ("truncated", -32602, "truncated"),
        ("trailing", -32602, "after its last field"),
        ("method code", -32601, "method code 9"),
        ("module handle", -32001, "handle 5"),
        ("offset past the arena", -32006, "outside the arena"),
        ("dtype code", -32003, "dtype code 7"),
        ("wrong shape", -32002, "input"),
        ("flags", -32602, "flags"),
        ("huge extent", -32602, "shape[0]"),
        ("version", -32600, "version 3"),
    ])
    func badRecords(_ label: String, _ code: Int, _ fragment: String) throws {
        var session = try Session()
        try session.put(randomTensor([2, 3, 16], seed: 5), at: 0)
        let good = Self.forward()
        var record: [UInt8] = switch label {
        case "truncated": Array(good.prefix(good.count - 20))
        case "trailing": good + [0, 0]
        case "method code": Self.forward(method: 9)
        case "module handle": Self.forward(handle: 5)
        case "offset past the arena": Self.forward(input: 8192 - 64)
        case "dtype code": Self.forward(dtype: 7)
        case "wrong shape": Self.forward(shape: [2, 3, 17])
        case "flags": Self.forward(flags: 1 << 7)
        case "huge extent": Self.forward(shape: [UInt64.max, 1, 1])
        default: [good[0], 3] + good.dropFirst(2)
        }
        let length = UInt32(record.count)
        for i in 0..<4 { record[4 + i] = UInt8(truncatingIfNeeded: length >> (8 * i)) }
        let error = try session.error(record)
        expectError(error, code: code, fragment)
        let (status, _, _) = session.send(good)
        #expect(status == 0, "a good record after the bad one")
        try session.harness.expectServes(session.oracle)
    }

    @Test("a tapes.release record drops the tapes listed and is never answered, even when malformed")
    func tapesRelease() throws {
        var session = try Session()
        try session.put(randomTensor([2, 3, 16], seed: 5), at: 0)
        var tapes: [UInt64] = []
        for id in 1...3 {
            var reader = CallRecordReader(session.send(Self.forward(id: UInt64(id))).body)
            tapes.append(try reader.u64("tape"))
        }
        #expect(try session.harness.result("network.info")["pending_tapes"]?.intValue == 3)
        func release(_ tapes: [UInt64], count: UInt32? = nil) -> [UInt8] {
            var writer = CallRecordWriter(code: CallRecord.Method.tapesRelease.rawValue, id: 0)
            writer.u32(count ?? UInt32(tapes.count))
            for tape in tapes { writer.u64(tape) }
            return writer.finish()
        }
        let answer = serviceLock.withLock { session.harness.service.handleRecord(release([tapes[0], tapes[2], 999])) }
        #expect(answer == nil)
        #expect(try session.harness.result("network.info")["pending_tapes"]?.intValue == 1)
        let malformed = serviceLock.withLock { session.harness.service.handleRecord(release([tapes[1]], count: 1 << 30)) }
        #expect(malformed == nil)
        #expect(try session.harness.result("network.info")["pending_tapes"]?.intValue == 1, "a malformed release drops nothing")
    }

    @Test("a record before initialize: -32000")
    func beforeInitialize() throws {
        let harness = try ServerHarness(initialize: false)
        let response = try #require(serviceLock.withLock { harness.service.handleRecord(Self.forward(id: 3)) })
        #expect(response[2] == 1 && response[8] == 3)
        let json = try JanssonCodec.decode(Array(response.dropFirst(24)))
        #expect(json["code"]?.intValue == -32000)
    }

    @Test("the reader frames records between JSON texts; short, oversized and cut records are malformed")
    func framing() throws {
        let record = Self.forward(id: 9)
        let short: [UInt8] = [0xFF, 1, 1, 0, 8, 0, 0, 0]
        let stream = Array("{\"a\":1}\n".utf8) + record + Array("\n[]\n".utf8) + short
            + [0xFF, 1, 1, 0, 0, 0, 1, 0] + Array(repeating: 0, count: 65536 - 8) + Array("{}\n".utf8) + Array(record.prefix(30))
        var ends: [Int32] = [0, 0]
        #expect(Glibc.pipe(&ends) == 0)
        let (readEnd, writeEnd) = (ends[0], ends[1])
        let writer = Thread {
            stream.withUnsafeBytes { bytes in
                var offset = 0
                while offset < bytes.count {
                    let n = Glibc.write(writeEnd, bytes.baseAddress! + offset, bytes.count - offset)
                    if n <= 0 { break }
                    offset += n
                }
            }
            close(writeEnd)
        }
        writer.start()
        defer { close(readEnd) }
        let reader = MessageReader(fileDescriptor: readEnd, maximumMessageSize: 4096)
        var messages: [FramedMessage] = []
        while let message = reader.next() { messages.append(message) }
        try #require(messages.count == 7, "\(messages)")
        guard case let .message(body, .record) = messages[1] else { Issue.record("not a record: \(messages[1])"); return }
        #expect(body == record)
        guard case .message(_, .newlineDelimited) = messages[2] else { Issue.record("\(messages[2])"); return }
        guard case let .malformed(reason, .record) = messages[3] else { Issue.record("\(messages[3])"); return }
        #expect(reason.contains("length 8 is shorter than its 16-byte header"))
        guard case let .malformed(oversized, .record) = messages[4] else { Issue.record("\(messages[4])"); return }
        #expect(oversized.contains("65536 exceeds the limit of 4096"))
        guard case .message(_, .newlineDelimited) = messages[5] else { Issue.record("\(messages[5])"); return }
        guard case let .malformed(cut, .record) = messages[6] else { Issue.record("\(messages[6])"); return }
        #expect(cut.contains("30 of the call record's \(record.count) bytes"))
    }
}
