import Foundation
import LycorisFormats
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Files that are not safetensors at all are named as such, and files killed processes left
/// behind (interrupted saves, arenas of killed servers) are removed by the next save.
@Suite("foreign files and leftovers")
struct LeftoverAndForeignFileTests {
    static func temporaryDirectory() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("leftovers-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return directory
    }

    /// The pid of a process that has exited and been reaped.
    static func deadPID() throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/true")
        try process.run()
        process.waitUntilExit()
        return process.processIdentifier
    }

    @Test("a file that is text, a ZIP (torch.save), a pickle, a PNG or GGUF: \"not a safetensors file\" saying which", arguments: [
        ("hello this is a text file\n", "the file is text (it begins \"hello th\"), not a safetensors header"),
        ("{\"a\": 1}\n\n", "the file is text (it begins \"{\\\"a\\\": 1}\"), not a safetensors header"),
        ("PK\u{03}\u{04}\u{14}\u{00}\u{00}\u{00}\u{08}\u{00}rest", "a ZIP archive (torch.save's format; convert it to safetensors)"),
        ("\u{89}PNG\r\n\u{1A}\n\u{00}\u{00}", "a PNG image"),
        ("GGUF\u{03}\u{00}\u{00}\u{00}\u{00}\u{00}", "a GGUF file"),
    ])
    func foreignFiles(_ content: String, _ expected: String) throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("adapter.safetensors").path
        // Latin-1 bytes, one per scalar (0x89 stays one byte).
        try Data(content.unicodeScalars.map { UInt8($0.value) }).write(to: URL(fileURLWithPath: path))
        #expect {
            _ = try SafetensorsFile(path: path)
        } throws: { error in
            guard let error = error as? SafetensorsError else { return false }
            return error.rule == "not a safetensors file" && error.path == path && error.description.contains(expected)
                && error.description.hasPrefix("safetensors file '\(path)': not a safetensors file: ")
        }
    }

    @Test("a pickle's protocol byte and a huge binary length prefix: pickle named, unknown binary keeps its rule")
    func pickleAndBinary() throws {
        let pickle = [UInt8]([0x80, 0x04, 0x95, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00])
        #expect(throws: SafetensorsError.notSafetensors(path: "<memory>", content: "a Python pickle")) {
            _ = try pickle.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
        }
        let binary = [UInt8]([0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80])
        #expect(throws: SafetensorsError.headerTooLarge(path: "<memory>", headerLength: 1 << 63)) {
            _ = try binary.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
        }
    }

    @Test("leftover names: only the exact forms carry a pid")
    func names() {
        #expect(LeftoverFiles.temporaryFilePID(".a.safetensors.tmp-1234-9f0a") == 1234)
        #expect(LeftoverFiles.temporaryFilePID(".x.tmp-7-ABCDEF") == 7)
        for name in ["a.safetensors.tmp-1234-9f", ".a.safetensors.tmp-12x4-9f", ".a.tmp-1234-xyz", ".a.tmp-1234", ".a.tmp--1-f",
                     ".a.tmp-+12-f", ".a.tmp-1234-9f-0", "lycoris-arena-1-2-f"] {
            #expect(LeftoverFiles.temporaryFilePID(name) == nil, "\(name)")
        }
        #expect(LeftoverFiles.arenaFilePID("lycoris-arena-4321-3-a1b2") == 4321)
        for name in ["lycoris-arena-4321-a1b2", "lycoris-arena-4321-3-a1b2-x", "lycoris-arena-x-3-a1", "xlycoris-arena-1-2-f"] {
            #expect(LeftoverFiles.arenaFilePID(name) == nil, "\(name)")
        }
    }

    @Test("the next save into a directory removes temporary files of dead processes, not of live ones or other files")
    func saveRemovesDeadTemporaries() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let dead = try Self.deadPID()
        let names = [
            "dead": ".adapter.safetensors.tmp-\(dead)-3fa9c1", "deadOther": ".merged.safetensors.tmp-\(dead)-01",
            "live": ".adapter.safetensors.tmp-\(getpid())-77", "parent": ".adapter.safetensors.tmp-\(getppid())-78",
            "unrelated": "adapter.safetensors.tmp-\(dead)-3fa9c1", "user": "notes.txt",
        ]
        for name in names.values { try Data("partial".utf8).write(to: directory.appendingPathComponent(name)) }
        var writer = SafetensorsWriter()
        try writer.addRaw("t", dtype: .f32, shape: [1], bytes: [0, 0, 0x80, 0x3F])
        try writer.write(toPath: directory.appendingPathComponent("adapter.safetensors").path)
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: directory.path))
        #expect(left == [names["live"]!, names["parent"]!, names["unrelated"]!, names["user"]!, "adapter.safetensors"])
    }

    @Test("removeDead reports what it removed and skips a missing directory")
    func removeDeadReports() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let dead = try Self.deadPID()
        let arena = "lycoris-arena-\(dead)-1-beef"
        try Data().write(to: directory.appendingPathComponent(arena))
        try Data().write(to: directory.appendingPathComponent("lycoris-arena-\(getpid())-1-beef"))
        let removed = LeftoverFiles.removeDead(in: directory.path, pidOf: LeftoverFiles.arenaFilePID)
        #expect(removed == [directory.appendingPathComponent(arena).path])
        #expect(LeftoverFiles.removeDead(in: directory.appendingPathComponent("missing").path, pidOf: LeftoverFiles.arenaFilePID).isEmpty)
    }
}
