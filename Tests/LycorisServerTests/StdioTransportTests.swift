import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import LycorisRPC
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The real `lycoris-server` binary over pipes. Serialized: each test owns one child process
/// (and the pipes never leak into another test's child).
@Suite("lycoris-server over stdio", .serialized)
struct StdioTransportTests {
    /// A session's opening requests (ids 1…3) and the oracle for the network they build.
    static func opening() throws -> (requests: [JSONValue], oracle: OracleNetwork) {
        let (create, set, oracle) = try OracleNetwork.prepare()
        return ([rpcRequest(1, "initialize", ["protocol_version": "1.0", "client": "stdio-test"]),
                 rpcRequest(2, "network.create", create),
                 rpcRequest(3, "parameters.set", set)], oracle)
    }

    static let x = randomTensor([2, 3, 16], seed: 17)

    static func forwardRequest(_ id: JSONValue, input: Tensor = x) -> JSONValue {
        rpcRequest(id, "forward", ["calls": [["module": "lin", "input": Wire.tensor(input)]]])
    }

    /// Checks a forward response against the oracle.
    static func expectForward(_ response: FramedResponse, id: JSONValue, oracle: OracleNetwork, input: Tensor = x,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let parsed = try WireResponse(response.json, sourceLocation: sourceLocation)
        #expect(parsed.id == id, sourceLocation: sourceLocation)
        #expect(parsed.error == nil, "\(String(describing: parsed.error))", sourceLocation: sourceLocation)
        let y = try Wire.decode(parsed.result?["results"]?[0]?["output"], sourceLocation: sourceLocation)
        expectClose(y, try oracle.delta("lin", input), "forward over stdio", sourceLocation: sourceLocation)
    }

    /// Checks that responses 0..<count are successes with ids 1, 2, 3, ….
    static func expectOpening(_ responses: [FramedResponse], count: Int = 3, sourceLocation: SourceLocation = #_sourceLocation) throws {
        for index in 0..<count {
            let response = try WireResponse(responses[index].json, sourceLocation: sourceLocation)
            #expect(response.id == JSONValue(index + 1), sourceLocation: sourceLocation)
            #expect(response.error == nil, "\(String(describing: response.error))", sourceLocation: sourceLocation)
        }
    }

    @Test("NDJSON requests get NDJSON responses, one line each; closing stdin exits 0")
    func ndjson() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.sendLine(Self.forwardRequest(4))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let stdout = server.stdout
        #expect(stdout.last == 0x0A)
        let lines = stdout.split(separator: 0x0A, omittingEmptySubsequences: false).dropLast()
        #expect(lines.count == 4)
        let responses = try FramedResponse.parseAll(stdout)
        #expect(responses.allSatisfy { $0.framing == .ndjson })
        try Self.expectOpening(responses)
        try Self.expectForward(responses[3], id: 4, oracle: oracle)
    }

    @Test("Content-Length requests get Content-Length responses with exact lengths")
    func contentLength() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendFramed(request) }
        try server.sendFramed(Self.forwardRequest(4))
        let responses = try server.waitForMessages(4)
        #expect(responses.count == 4)
        #expect(responses.allSatisfy { $0.framing == .contentLength })
        try Self.expectOpening(responses)
        try Self.expectForward(responses[3], id: 4, oracle: oracle)
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        #expect(try FramedResponse.parseAll(server.stdout).count == 4)
    }

    @Test("Content-Length headers: the name in any case, other header lines ignored")
    func contentLengthHeaders() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendFramed(request) }
        func framed(_ id: Int, _ header: (Int) -> String) -> [UInt8] {
            let body = JanssonCodec.encode(Self.forwardRequest(JSONValue(id)))
            return Array(header(body.count).utf8) + body
        }
        try server.send(framed(4) { "content-length: \($0)\r\n\r\n" })
        try server.send(framed(5) { "CONTENT-LENGTH:\($0)\n\n" })
        try server.send(framed(6) { "Content-Length: \($0)\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" })
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        let errors = responses.compactMap { try? $0.response.error?.message }
        try #require(responses.count == 6, "\(responses.count) responses; errors: \(errors)")
        try Self.expectOpening(responses)
        for (index, id) in [4, 5, 6].enumerated() {
            #expect(responses[3 + index].framing == .contentLength)
            try Self.expectForward(responses[3 + index], id: JSONValue(id), oracle: oracle)
        }
    }

    @Test("both framings mixed in one stream, with blank lines between messages: each reply in its request's framing")
    func mixedFramings() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        try server.send("\n\r\n  \n")
        try server.sendLine(requests[0])
        try server.send("\n\n")
        try server.sendFramed(requests[1])
        try server.send("\r\n\t\r\n")
        try server.sendLine(requests[2])
        try server.sendFramed(Self.forwardRequest(4))
        try server.send("\n")
        try server.sendLine(Self.forwardRequest(5))
        try server.send("\r\n\r\n")
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.map(\.framing) == [.ndjson, .contentLength, .ndjson, .contentLength, .ndjson])
        try Self.expectOpening(responses)
        try Self.expectForward(responses[3], id: 4, oracle: oracle)
        try Self.expectForward(responses[4], id: 5, oracle: oracle)
    }

    @Test("a CRLF-terminated NDJSON line is one message")
    func crlfLine() throws {
        let server = try ServerProcess()
        try server.send(JanssonCodec.encode(rpcRequest(1, "initialize")) + Array("\r\n".utf8))
        let responses = try server.waitForMessages(1)
        #expect(try responses[0].response.error == nil)
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
    }

    @Test("a batch over NDJSON: one line holding the array of responses")
    func batch() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        try server.sendLine(.array(requests + [Self.forwardRequest(4), rpcRequest(5, "nope")]))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        try #require(responses.count == 1)
        let items = try #require(responses[0].json.arrayValue)
        try #require(items.count == 5)
        let framed = items.map { FramedResponse(framing: .ndjson, body: [], json: $0) }
        try Self.expectOpening(framed)
        try Self.expectForward(framed[3], id: 4, oracle: oracle)
        #expect(try framed[4].response.error?.code == -32601)
    }

    @Test("a batch of successful notifications produces no bytes at all")
    func notificationBatch() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.sendLine([rpcRequest(nil, "network.set_multiplier", ["multiplier": 2.0]), rpcRequest(nil, "network.seed", ["seed": 3])])
        try server.sendLine(rpcRequest(nil, "gradients.zero"))
        try server.sendLine(Self.forwardRequest(4))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 4)
        try Self.expectOpening(responses)
        // The notifications ran: the forward sees multiplier 2.
        let y = try Wire.decode(try responses[3].response.result?["results"]?[0]?["output"])
        expectClose(y, try oracle.delta("lin", Self.x) * 2, "forward after the notifications")
    }

    @Test("failing notifications, alone or in a batch, produce no bytes at all")
    func failingNotifications() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.sendLine(rpcRequest(nil, "no.such.method"))
        try server.sendLine(rpcRequest(nil, "forward", ["calls": [["module": "missing", "input": Wire.tensor(Self.x)]]]))
        try server.sendLine([rpcRequest(nil, "no.such.method"), rpcRequest(nil, "network.seed", ["seed": -1])])
        try server.sendLine(Self.forwardRequest(4))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let text = String(decoding: server.stdout, as: UTF8.self)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 4, "stdout: \(text.prefix(2000))")
        #expect(!text.contains("\nnull\n") && !text.contains("[null"), "notifications were answered with null")
        if responses.count == 4 { try Self.expectForward(responses[3], id: 4, oracle: oracle) }
    }

    @Test("stdout carries only framed responses; logs go to stderr")
    func stdoutIsProtocolOnly() throws {
        let (requests, _) = try Self.opening()
        let server = try ServerProcess(arguments: ["--log-level", "debug"])
        for request in requests { try server.sendLine(request) }
        try server.sendLine(rpcRequest(4, "forward", ["calls": [["module": "missing", "input": Wire.tensor(Self.x)]]]))
        try server.sendFramed(rpcRequest(5, "network.info"))
        try server.send("{not json\n")
        try server.sendLine(rpcRequest(6, "arena.create", ["size": 4096]))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        // Every byte of stdout belongs to a framed JSON-RPC response.
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 7)
        let ids = try responses.map { try $0.response.id }
        #expect(ids == [1, 2, 3, 4, 5, .null, 6])
        #expect(try responses[3].response.error?.code == -32001)
        #expect(try responses[5].response.error?.code == -32700)
        let stderr = server.stderr
        #expect(stderr.contains("lycoris-server 0.1.0 ready"), "\(stderr)")
        #expect(stderr.contains("client: stdio-test"), "\(stderr)")
        #expect(stderr.contains("forward failed: Unknown module: missing"), "\(stderr)")
        #expect(!String(decoding: server.stdout, as: UTF8.self).contains("ready"))
    }

    @Test("closing stdin: exit status 0 and the session's arena file is gone")
    func eofRemovesArena() throws {
        let server = try ServerProcess()
        try server.sendLine(rpcRequest(1, "initialize"))
        try server.sendLine(rpcRequest(2, "arena.create", ["size": 65536]))
        let responses = try server.waitForMessages(2)
        let path = try #require(try responses[1].response.result?["path"]?.stringValue)
        #expect(path.hasPrefix(server.arenaDirectory.path + "/lycoris-arena-"))
        #expect(FileManager.default.fileExists(atPath: path))
        server.closeStdin()
        let exit = try server.waitForExit()
        #expect(exit.status == 0 && exit.reason == .exit)
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(server.arenaFiles.isEmpty)
    }

    @Test("shutdown: a null result, then exit 0 with stdin still open; later requests are not served")
    func shutdown() throws {
        let server = try ServerProcess()
        try server.sendLine(rpcRequest(1, "initialize"))
        try server.sendLine(rpcRequest(2, "arena.create", ["size": 4096]))
        let created = try server.waitForMessages(2)
        let path = try #require(try created[1].response.result?["path"]?.stringValue)
        try server.sendFramed(rpcRequest(3, "shutdown"))
        let exit = try server.waitForExit()
        #expect(exit.status == 0 && exit.reason == .exit)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 3)
        let last = try responses[2].response
        #expect(last.id == 3 && last.result == .null && responses[2].framing == .contentLength)
        #expect(!FileManager.default.fileExists(atPath: path))
        server.closeStdin()
    }

    @Test("SIGTERM, SIGINT, SIGHUP with an arena: the arena file is removed", arguments: [
        (SIGTERM, false), (SIGINT, false), (SIGHUP, false), (SIGTERM, true),
    ])
    func terminatingSignal(_ sig: Int32, _ spawnedWithSignalBlocked: Bool) throws {
        // A parent that spawns from a thread with the signal blocked (libdispatch's worker
        // threads block SIGTERM; so does this test runner's) hands that mask down through
        // exec; the server must still honour the signal it promises to clean up on.
        let server = try ServerProcess(blockedSignals: spawnedWithSignalBlocked ? [sig] : [])
        try server.sendLine(rpcRequest(1, "initialize"))
        try server.sendLine(rpcRequest(2, "arena.create", ["size": 65536]))
        let responses = try server.waitForMessages(2)
        let path = try #require(try responses[1].response.result?["path"]?.stringValue)
        #expect(FileManager.default.fileExists(atPath: path))
        if let blocked = server.blocks(sig) {
            #expect(blocked == false, "signal \(sig) is still blocked in the server (SigBlk \(server.procStatus("SigBlk") ?? "?"))")
        }
        kill(server.process.processIdentifier, sig)
        let exit = try server.waitForExit(timeout: 5)
        #expect(exit.reason == .exit && exit.status == 128 + sig, "\(exit)")
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(server.arenaFiles.isEmpty)
    }

    @Test("a Content-Length over the limit: -32700 naming the limit; earlier and later messages are served")
    func oversizedContentLength() throws {
        let (requests, _) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.send("Content-Length: 314572800\r\n\r\n{\"jsonrpc\":\"2.0\"")
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 4)
        try Self.expectOpening(responses)
        let error = try #require(try responses[3].response.error)
        #expect(try responses[3].response.id == .null)
        #expect(responses[3].framing == .contentLength)
        expectError(error, code: -32700, "Content-Length 314572800 exceeds the limit of 268435456 bytes")
    }

    @Test("a Content-Length of limit + 1 with its whole body: skipped, answered -32700, and the next request is served")
    func oversizedBodySkipped() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        let length = (256 << 20) + 1
        try server.send("Content-Length: \(length)\r\n\r\n")
        // The body: blanks, which would be skipped as space between messages if they were
        // not consumed as the declared body.
        let chunk = [UInt8](repeating: 0x20, count: 1 << 20)
        var remaining = length
        while remaining > 0 {
            let n = min(remaining, chunk.count)
            try server.send(n == chunk.count ? chunk : Array(chunk[0..<n]))
            remaining -= n
        }
        try server.sendLine(Self.forwardRequest(4))
        let responses = try server.waitForMessages(5)
        try Self.expectOpening(responses)
        expectError(try #require(try responses[3].response.error), code: -32700, "Content-Length \(length) exceeds the limit of 268435456 bytes")
        try Self.expectForward(responses[4], id: 4, oracle: oracle)
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
    }

    @Test("a Content-Length body cut short by EOF: -32700 naming the byte counts, exit 0")
    func truncatedBody() throws {
        let server = try ServerProcess()
        try server.sendLine(rpcRequest(1, "initialize"))
        let body = Array(#"{"jsonrpc":"2.0","id":2,"method":"network.info"}"#.utf8)
        try server.send(Array("Content-Length: \(body.count + 10)\r\n\r\n".utf8) + body)
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 2)
        let error = try #require(try responses[1].response.error)
        expectError(error, code: -32700, "input ended after \(body.count) of \(body.count + 10) bytes")
        #expect(try responses[1].response.id == .null)
    }

    @Test("a header without a usable Content-Length and an unparsable line: -32700 each, then serving goes on")
    func badHeaderAndLine() throws {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.send("Content-Length: twelve\r\n\r\n")
        try server.send("{\"jsonrpc\": \"2.0\", \"id\": 9,\n")
        try server.sendFramed(Self.forwardRequest(4))
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        try #require(responses.count == 6)
        try Self.expectOpening(responses)
        expectError(try #require(try responses[3].response.error), code: -32700, "no valid Content-Length")
        expectError(try #require(try responses[4].response.error), code: -32700, "Parse error")
        try Self.expectForward(responses[5], id: 4, oracle: oracle)
    }

    @Test("input ending inside a Content-Length header: -32700, exit 0")
    func eofInHeader() throws {
        let server = try ServerProcess()
        try server.sendLine(rpcRequest(1, "initialize"))
        try server.send("Content-Length: 20\r\n")
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        let responses = try FramedResponse.parseAll(server.stdout)
        try #require(responses.count == 2)
        expectError(try #require(try responses[1].response.error), code: -32700, "input ended inside a Content-Length header")
    }
}
