import Foundation
import LycorisRPC
import Testing
@testable import LycorisServer

/// The OpenRPC document compiled into the server (`rpc.discover`) is protocol/openrpc.json,
/// byte for byte, and it describes exactly the methods of the server's table.
@Suite("OpenRPC document")
struct OpenRPCDocumentTests {
    /// The repository root: this file is Tests/LycorisServerTests/OpenRPCDocumentTests.swift.
    static let repositoryRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let documentURL = repositoryRoot.appendingPathComponent("protocol/openrpc.json")

    @Test("the embedded text equals protocol/openrpc.json byte for byte")
    func embeddedTextMatchesFile() throws {
        let file = try Data(contentsOf: Self.documentURL)
        let embedded = Data(OpenRPCDocument.text.utf8)
        let firstDifference = zip(file, embedded).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(embedded == file, """
            OpenRPCDocument.swift is stale (\(embedded.count) bytes embedded, \(file.count) in the file, \
            first difference at byte \(firstDifference.map(String.init) ?? "end")): \
            run python3 scripts/embed_openrpc.py and rebuild
            """)
    }

    @Test("the document parses, is OpenRPC, and lists every method of the server once")
    func documentListsEveryMethod() throws {
        let document = try JSONSerialization.jsonObject(with: Data(OpenRPCDocument.text.utf8)) as? [String: Any]
        let root = try #require(document, "the document is not a JSON object")
        let version = try #require(root["openrpc"] as? String, "no openrpc field")
        #expect(version.hasPrefix("1.2."))
        let info = try #require(root["info"] as? [String: Any])
        #expect(info["title"] as? String == "lycoris-server")
        #expect(info["version"] as? String == LycorisService.protocolVersion)

        let methods = try #require(root["methods"] as? [[String: Any]], "no methods array")
        let names = methods.compactMap { $0["name"] as? String }
        #expect(names.count == methods.count, "a method entry has no name")
        #expect(Set(names).count == names.count, "a method is listed twice: \(names)")
        let table = Set(LycorisService.methods.keys)
        #expect(Set(names) == table, """
            missing from the document: \(table.subtracting(names).sorted()); \
            not in the server: \(Set(names).subtracting(table).sorted())
            """)
        for method in methods {
            let name = method["name"] as? String ?? "?"
            #expect(method["paramStructure"] as? String == "by-name", "\(name): paramStructure")
            #expect(method["params"] is [Any], "\(name): params")
            #expect((method["result"] as? [String: Any])?["schema"] != nil, "\(name): result schema")
        }
    }

    @Test("rpc.discover answers the document")
    func discoverAnswersTheDocument() throws {
        let service = LycorisService()
        let answer = try service.handle(method: "rpc.discover", params: nil)
        let expected = try JanssonCodec.decode(Array(OpenRPCDocument.text.utf8))
        #expect(answer == expected)
    }
}
