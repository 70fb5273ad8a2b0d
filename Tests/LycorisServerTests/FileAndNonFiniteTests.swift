import Foundation
import LycorisCore
import LycorisFormats
import LycorisRPC
import LycorisTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `file.describe` (what clients read instead of parsing headers), non-finite values named by
/// module and pass on every path, and arenas of dead servers removed at start.
@Suite("file.describe, non-finite names, leftover arenas")
struct FileAndNonFiniteTests {
    @Test("file.describe answers every key, dtype, shape (file order) and the metadata, as the reader sees them")
    func describe() throws {
        let harness = try ServerHarness()
        let path = networkFixture("loha")
        let result = try harness.result("file.describe", ["path": .string(path)])
        let file = try SafetensorsFile(path: path)
        let tensors = try #require(result["tensors"]?.arrayValue)
        #expect(tensors.count == file.tensors.count && !tensors.isEmpty)
        for (entry, info) in zip(tensors, file.tensors) {
            #expect(entry["key"]?.stringValue == info.name)
            #expect(entry["dtype"]?.stringValue == info.dtype.rawValue)
            #expect(entry["shape"]?.arrayValue?.compactMap(\.intValue) == info.shape)
        }
        #expect(result["bytes"]?.intValue == file.fileSize)
        let metadata = try #require(result["metadata"]?.objectValue)
        #expect(metadata.members.count == file.metadata.count)
        #expect(metadata["oracle"]?.stringValue == "lycoris-lora 4.1.3")
    }

    @Test("file.describe of a text file, a truncated file and a missing file: -32005 naming the file and the rule; serving goes on")
    func describeBadFiles() throws {
        let harness = try ServerHarness()
        let text = harness.path("notes.safetensors")
        try Data("these are my notes\n".utf8).write(to: URL(fileURLWithPath: text))
        let error = try harness.error("file.describe", ["path": .string(text)])
        expectError(error, code: -32005, "safetensors file '\(text)': not a safetensors file: the file is text (it begins \"these ar\")")
        #expect(error.data == ["file": .string(text), "rule": "not a safetensors file"])
        let truncated = harness.path("truncated.safetensors")
        let bytes = try #require(fileBytes(networkFixture("loha")))
        try bytes.prefix(bytes.count - 7).write(to: URL(fileURLWithPath: truncated))
        let short = try harness.error("file.describe", ["path": .string(truncated)])
        expectError(short, code: -32005, "metadata incomplete buffer", "tensor data truncated")
        #expect(short.data?["rule"] == "metadata incomplete buffer")
        let missing = try harness.error("file.describe", ["path": "/nonexistent/a.safetensors"])
        expectError(missing, code: -32005, "'/nonexistent/a.safetensors': cannot open file")
        #expect(try harness.result("file.describe", ["path": .string(networkFixture("lora"))])["tensors"]?.arrayValue?.isEmpty == false)
    }

    @Test("NaN in a delta_weight_backward gradient: -32004 naming the module and the backward pass; the tape survives")
    func nonFiniteDeltaWeightGradient() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness)
        let dw = try harness.result("delta_weight", ["modules": ["lin"], "grad": true])
        let tape = try #require(dw["results"]?[0]?["tape"]?.intValue)
        var g = randomTensor([24, 16], seed: 5)
        g.scalars[11] = .nan
        let error = try harness.error("delta_weight_backward", ["calls": [["tape": JSONValue(tape), "grad": Wire.tensor(g)]]])
        expectError(error, code: -32004, "Non-finite values: calls[0].grad (module lin, backward) has 1 NaN or infinite elements")
        #expect(error.data == ["path": "calls[0].grad", "count": 1, "module": "lin", "pass": "backward"])
        g.scalars[11] = 0
        try harness.result("delta_weight_backward", ["calls": [["tape": JSONValue(tape), "grad": Wire.tensor(g)]]])
        try harness.expectServes(oracle)
    }

    @Test("a server start removes the arena files of dead servers, and keeps those of live ones")
    func startRemovesDeadArenas() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("arena-leftovers-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let finished = Process()
        finished.executableURL = URL(fileURLWithPath: "/bin/true")
        try finished.run()
        finished.waitUntilExit()
        let dead = "lycoris-arena-\(finished.processIdentifier)-1-c0ffee"
        let live = "lycoris-arena-\(getpid())-1-c0ffee"
        for name in [dead, live, "other-file"] { try Data(count: 64).write(to: directory.appendingPathComponent(name)) }
        let server = try ServerProcess(arenaDirectory: directory)
        try server.sendLine(["jsonrpc": "2.0", "id": 1, "method": "initialize"])
        _ = try server.waitForMessages(1)
        #expect(Set(server.arenaFiles) == [live, "other-file"])
        server.closeStdin()
        #expect(try server.waitForExit().status == 0)
        // stderr is drained by a reader thread: read it once the process has ended.
        #expect(server.stderr.contains("removed \(directory.path)/\(dead), the arena of a server that is gone"), "\(server.stderr)")
    }
}
