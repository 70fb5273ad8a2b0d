import Foundation
import Testing

/// `convert` and `suggest` as a person and a script see them: the summary table within 100
/// columns, `--json`, and the exit status and message of a failed job or bad usage.
@Suite("lycoris convert and suggest")
struct JobCommandTests {
    static func temporaryDirectory() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-job-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return directory
    }

    /// A safetensors file of zero F32 tensors with these shapes.
    static func writeZeros(_ shapes: [(String, [Int])], to path: String) throws {
        var offset = 0, entries: [String] = []
        for (name, shape) in shapes {
            let bytes = 4 * shape.reduce(1, *)
            entries.append("\"\(name)\":{\"dtype\":\"F32\",\"shape\":\(shape),\"data_offsets\":[\(offset),\(offset + bytes)]}")
            offset += bytes
        }
        var header = Array("{\(entries.joined(separator: ","))}".utf8)
        while header.count % 8 != 0 { header.append(UInt8(ascii: " ")) }
        var data = withUnsafeBytes(of: UInt64(header.count).littleEndian) { Data($0) }
        data.append(contentsOf: header)
        data.append(Data(count: offset))
        try data.write(to: URL(fileURLWithPath: path))
    }

    /// The module names `info --json` reads from a file (independent of convert's report).
    static func moduleNames(_ path: String) throws -> [String] {
        let info = try CommandLineTests.run(["info", path, "--json"])
        let json = try #require(try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any])
        return try #require(json["modules"] as? [[String: Any]]).compactMap { $0["name"] as? String }.sorted()
    }

    @Test("convert: --json reports the modules the written file holds; the table fits 100 columns; --quiet leaves stderr empty")
    func convert() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let input = CommandLineTests.networkFile("lora"), out = directory.appendingPathComponent("out.safetensors").path
        let names = try Self.moduleNames(input)
        #expect(names.count == 5)
        let expected = names.map { "lora_unet_" + $0.dropFirst("lycoris_".count) }.filter { !$0.contains("mid_block") }
        let dropped = names.count - expected.count
        #expect(dropped > 0 && !expected.isEmpty)

        let json = try CommandLineTests.run(["convert", input, out, "--rename", "lycoris_=lora_unet_", "--drop", "mid_block", "--json"])
        #expect(json.status == 0 && json.stderr.isEmpty, "\(json.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect((report["written"] as? [String])?.sorted() == expected)
        #expect((report["dropped"] as? [String])?.count == dropped)
        #expect(report["renamed"] as? Int == names.count && report["output"] as? String == out)
        #expect(try Self.moduleNames(out) == expected)

        let text = try CommandLineTests.run(["convert", input, out, "--drop", "mid_block", "--dtype", "f16", "--quiet"])
        #expect(text.status == 0 && text.stderr.isEmpty, "\(text.stderr)")
        let lines = text.stdout.split(separator: "\n")
        #expect(lines.allSatisfy { $0.count <= 100 }, "\(lines.filter { $0.count > 100 })")
        let header = try #require(lines.first { $0.hasPrefix("output") })
        #expect(header.split(separator: " ") == ["output", "written", "renamed", "dropped", "repaired"])
        let row = try #require(lines.first { $0.hasPrefix(out.count > 56 ? "…" : out) })
        #expect(row.split(separator: " ").suffix(4) == ["\(expected.count)", "0", "\(dropped)", "0"])
        #expect(text.stdout.contains("dropped: \(dropped)"))
    }

    @Test("convert, resize, extract and merge: an output path that is a folder fails the job (exit 1) before it starts")
    func outputFolder() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let input = CommandLineTests.networkFile("lora"), folder = directory.path
        for arguments in [["convert", input, folder], ["resize", input, folder, "--rank", "2"],
                          ["extract", CommandLineTests.networkFile("base"), CommandLineTests.networkFile("base"), folder],
                          ["merge", "--base", CommandLineTests.networkFile("base"), "--adapter", input, "--out", folder]] {
            let result = try CommandLineTests.run(arguments)
            #expect(result.status == 1, "\(arguments): \(result.stderr)")
            #expect(result.stderr == "Error: \(folder) is a folder; give the path of the .safetensors file to write\n", "\(arguments)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: folder).isEmpty)
        }
    }

    @Test("a missing input fails the job: exit 1, the file named, nothing written")
    func missingInput() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let missing = directory.appendingPathComponent("missing.safetensors").path
        let out = directory.appendingPathComponent("out.safetensors").path
        for arguments in [["convert", missing, out], ["resize", missing, out], ["suggest", "--model", missing, "--budget", "1MB"],
                          ["merge", "--base", CommandLineTests.networkFile("base"), "--adapter", missing, "--out", out]] {
            let result = try CommandLineTests.run(arguments)
            #expect(result.status == 1 && result.stderr.hasPrefix("Error: ") && result.stderr.contains(missing), "\(arguments): \(result.stderr)")
            #expect(!result.stderr.contains("Usage:"), "\(arguments)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty, "\(arguments)")
        }
    }

    @Test("bad usage: exit 64 with the subcommand's usage; --dtype names the four float dtypes")
    func badUsage() throws {
        let input = CommandLineTests.networkFile("lora")
        let dtype = try CommandLineTests.run(["convert", input, "/nonexistent/x.safetensors", "--dtype", "i8"])
        #expect(dtype.status == 64 && dtype.stderr.contains("'f32', 'f16', 'bf16' or 'f64'"), "\(dtype.stderr)")
        #expect(dtype.stderr.contains("Usage: lycoris convert"))
        let peft = try CommandLineTests.run(["convert", input, "/nonexistent/peft", "--to", "peft"])
        #expect(peft.status == 64 && peft.stderr.hasPrefix("Error: --to peft needs --model CHECKPOINT"), "\(peft.stderr)")
        #expect(peft.stderr.contains("Usage: lycoris convert"))
    }

    @Test("suggest: blocks in the order of their numbers, three algorithms in one block aligned, rows within 100 columns")
    func suggest() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        // A plain state dict: prime-sized layers take LoHa at a high rank and LoRA at a low
        // one, 64×64 a LoKr; budget 4000 mixes all three in blocks_1.
        let model = directory.appendingPathComponent("mixed.safetensors").path
        try Self.writeZeros([("blocks.1.p.weight", [97, 89]), ("blocks.1.q.weight", [64, 64]), ("blocks.1.r.weight", [101, 7]),
                             ("blocks.10.p.weight", [8, 8]), ("blocks.2.p.weight", [97, 89])], to: model)
        let result = try CommandLineTests.run(["suggest", "--model", model, "--budget", "4000", "--quiet"])
        #expect(result.status == 0 && result.stderr.isEmpty, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n").map(String.init)
        #expect(lines.allSatisfy { $0.count <= 100 }, "\(lines.filter { $0.count > 100 })")
        let rows = lines.filter { $0.hasPrefix("blocks_") }
        #expect(rows.map { $0.split(separator: " ")[0] } == ["blocks_1", "blocks_2", "blocks_10"])
        let mixed = try #require(rows.first)
        #expect(mixed.contains("locon 1, loha 1, lokr 1"), "\(mixed)")
        // The ranks column starts at the same place in the header and every row.
        let column = try #require(lines.first?.range(of: "ranks")).lowerBound.utf16Offset(in: lines[0])
        for row in rows {
            let start = row.index(row.startIndex, offsetBy: column)
            #expect(row[row.index(before: start)] == " " && row[start].isNumber, "\(row)")
        }
    }
}
