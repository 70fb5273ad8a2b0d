import Foundation
import Testing

/// The `lycoris` executable as a user runs it: exit status, stdout, stderr.
@Suite("lycoris command line")
struct CommandLineTests {
    /// The built `lycoris` next to this test bundle (the test target depends on it, so it
    /// is always built first).
    static let executable: URL = {
        let bundleDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let candidates = [bundleDirectory, bundleDirectory.deletingLastPathComponent(), Bundle.main.bundleURL]
        return candidates.map { $0.appendingPathComponent("lycoris") }
            .first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? bundleDirectory.appendingPathComponent("lycoris")
    }()

    static let testsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    static func networkFile(_ name: String) -> String {
        testsDirectory.appendingPathComponent("LycorisAlgorithmsTests/Fixtures/networks/\(name).safetensors").path
    }

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    static func run(_ arguments: [String]) throws -> Result {
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                      stderr: String(decoding: stderr, as: UTF8.self))
    }

    @Test("info names each LyCORIS file's algorithm", arguments: [
        ("lora", "locon"), ("loha", "loha"), ("lokr", "lokr"), ("ia3", "ia3"), ("glora", "glora"), ("full", "full"),
        ("diag-oft", "diag-oft"), ("boft", "boft"), ("tlora", "tlora"), ("kohya_lora", "locon"),
        ("dora", "locon+dora"), ("dora_loha_input", "loha+dora"),
    ])
    func infoJSON(_ file: String, _ algorithm: String) throws {
        let result = try Self.run(["info", Self.networkFile(file), "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let modules = try #require(json["modules"] as? [[String: Any]])
        #expect(modules.count == 5)
        #expect(modules.allSatisfy { $0["algorithm"] as? String == algorithm })
        let axis = ["dora": "output", "dora_loha_input": "input"][file]
        #expect(modules.allSatisfy { ($0["dora_axis"] as? String) == axis && $0["dora_axis"] != nil })
        let totals = try #require(json["totals"] as? [String: Any])
        #expect(totals["parameters"] as? Int == modules.reduce(0) { $0 + ($1["parameters"] as? Int ?? 0) })
        #expect((json["metadata"] as? [String: String])?["oracle"] == "lycoris-lora 4.1.3")
    }

    @Test("info table shows rank, alpha, dtype and shapes")
    func infoTable() throws {
        let result = try Self.run(["info", Self.networkFile("loha")])
        #expect(result.status == 0)
        #expect(result.stdout.contains("lycoris_down_blocks_0_attentions_0_proj_in"))
        #expect(result.stdout.contains("hada_w1_a [24, 4]"))
        #expect(result.stdout.contains("algorithms: loha 5"))
        #expect(result.stdout.contains("metadata:"))
    }

    @Test("info on LyCORIS files of conv1d and conv3d layers: ranks and 3-D/5-D shapes")
    func infoConvNd() throws {
        let lora = try Self.run(["info", Self.networkFile("convnd_lora")])
        #expect(lora.status == 0, "\(lora.stderr)")
        #expect(lora.stdout.contains("lycoris_seq ") && lora.stdout.contains("lycoris_volume_strided "))
        #expect(lora.stdout.contains("lora_mid.weight [4, 4, 3]"), "conv1d Tucker core")
        #expect(lora.stdout.contains("lora_mid.weight [4, 4, 3, 1, 3]"), "conv3d Tucker core")
        #expect(lora.stdout.contains("lora_up.weight [6, 4, 1, 1, 1]"))
        #expect(lora.stdout.contains("algorithms: locon 4"))
        let loha = try Self.run(["info", Self.networkFile("convnd_loha"), "--json"])
        let json = try #require(try JSONSerialization.jsonObject(with: Data(loha.stdout.utf8)) as? [String: Any])
        let modules = try #require(json["modules"] as? [[String: Any]])
        #expect(modules.count == 4 && modules.allSatisfy { $0["algorithm"] as? String == "loha" && $0["rank"] as? Int == 4 })
    }

    @Test("info shows norm modules beside the LoRA modules of a train_norm file")
    func infoNorms() throws {
        let result = try Self.run(["info", Self.networkFile("norms")])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n")
        let index = try #require(lines.firstIndex { $0.hasPrefix("lycoris_mid_block_norm ") })
        let columns = lines[index].split(separator: " ", omittingEmptySubsequences: true)
        #expect(Array(columns[1...5]) == ["norms", "-", "-", "F32", "24"], "\(lines[index])")
        // The tensors do not fit the 100-column row: they follow on an indented line.
        #expect(lines[index + 1] == "    b_norm [12], w_norm [12]")
        #expect(result.stdout.contains("algorithms: locon 5, norms 1"))
    }

    @Test("every hostile safetensors file: an error naming the problem and exit status 1, never a crash")
    func hostileFiles() throws {
        let directory = Self.testsDirectory.appendingPathComponent("LycorisFormatsTests/Fixtures")
        let hostile = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix("bad_") }.sorted()
        #expect(hostile.count >= 20)
        for name in hostile {
            let result = try Self.run(["info", directory.appendingPathComponent(name).path])
            #expect(result.status == 1, "\(name): status \(result.status)")
            #expect(result.stderr.contains(name) && result.stderr.contains("Error:"), "\(name): \(result.stderr)")
            #expect(result.stdout.isEmpty, "\(name)")
        }
    }

    @Test("a missing file is an error naming it")
    func missingFile() throws {
        let result = try Self.run(["info", "/nonexistent/adapter.safetensors"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("/nonexistent/adapter.safetensors"))
    }

    @Test("merge writes the merged model and reports unmatched modules; --strict fails on them")
    func merge() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-merge-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("merged.safetensors").path
        let ok = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile("loha"),
                               "--out", out, "--multiplier", "0.5"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("merged 5 modules"))
        #expect(FileManager.default.fileExists(atPath: out))
        // A negative multiplier (subtracting an adapter) is a value, not an option name.
        let negative = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile("loha"),
                                     "--out", out, "--multiplier", "-0.5"])
        #expect(negative.status == 0 && negative.stdout.contains("merged 5 modules"), "\(negative.stderr)")
        // The norms file's LayerNorm module merges into the norm's weight and bias.
        let norms = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile("norms"),
                                  "--out", out, "--strict"])
        #expect(norms.status == 0, "\(norms.stderr)")
        #expect(norms.stdout.contains("merged 6 modules") && norms.stdout.contains("biases merged too: mid_block.norm.bias"))
        #expect(norms.stdout.contains("lycoris_mid_block_norm → mid_block.norm.weight (norms)"))
        // DoRA, GLoRA and Full files merge (their values: NetworkFileTests); Full's diff_b into the biases.
        for (file, algorithm) in [("dora", "locon"), ("glora", "glora"), ("full", "full")] {
            let merged = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile(file), "--out", out, "--strict"])
            #expect(merged.status == 0, "\(merged.stderr)")
            #expect(merged.stdout.contains("merged 5 modules") && merged.stdout.contains("(\(algorithm))"), "\(merged.stdout)")
            if file == "full" { #expect(merged.stdout.contains("biases merged too")) }
        }
        // A state dict without the adapter's layers (here an adapter file's own keys): every
        // module is unmatched, which --strict refuses: exit 1 (a failed job, not bad usage),
        // nothing written, no usage text.
        let strictOut = directory.appendingPathComponent("strict.safetensors").path
        let partial = try Self.run(["merge", "--base", Self.networkFile("lora"), "--adapter", Self.networkFile("loha"),
                                    "--out", strictOut, "--strict"])
        #expect(partial.status == 1)
        #expect(partial.stdout.contains("unmatched adapter modules (no base weight with that path): 5"))
        #expect(partial.stdout.contains("lycoris_mid_block_conv"))
        #expect(partial.stderr == "Error: 5 unmatched and 0 failed modules; --strict wrote nothing to \(strictOut)\n")
        #expect(!FileManager.default.fileExists(atPath: strictOut))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted() == ["merged.safetensors"])
    }

    /// The F32 tensors of a safetensors file, by name, as (shape, values).
    static func readF32(_ path: String) throws -> [String: (shape: [Int], values: [Float])] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let length = Int(data.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let header = try #require(try JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + length))) as? [String: Any])
        var tensors: [String: (shape: [Int], values: [Float])] = [:]
        for (name, entry) in header where name != "__metadata__" {
            let info = try #require(entry as? [String: Any])
            guard info["dtype"] as? String == "F32", let offsets = info["data_offsets"] as? [Int] else { continue }
            let bytes = data.subdata(in: (8 + length + offsets[0])..<(8 + length + offsets[1]))
            tensors[name] = (info["shape"] as? [Int] ?? [], bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) })
        }
        return tensors
    }

    @Test("merge of Diag-OFT, BOFT and T-LoRA files; rotations keep every column's norm; info describes them")
    func mergeOrthogonalAndTLoRA() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-merge-oft-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = try Self.readF32(Self.networkFile("base"))
        for algorithm in ["diag-oft", "boft"] {
            let out = directory.appendingPathComponent("\(algorithm).safetensors").path
            let result = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile(algorithm),
                                       "--out", out, "--strict"])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stdout.contains("merged 5 modules") && result.stdout.contains("mid_block.conv.weight (\(algorithm))"))
            let merged = try Self.readF32(out)
            for key in ["down_blocks.0.attentions.0.proj_in.weight", "down_blocks.0.resnets.0.conv1.weight", "mid_block.conv.weight"] {
                let (w0, w) = (try #require(base[key]), try #require(merged[key]))
                // W' = R·W0 with R orthogonal (constraint 0, no rescale): W' ≠ W0, each column's norm kept.
                let rows = w0.shape[0], columns = w0.values.count / rows
                #expect(zip(w0.values, w.values).contains { abs($0 - $1) > 1e-3 }, "\(algorithm) changes \(key)")
                for j in 0..<columns {
                    let before = (0..<rows).reduce(Float(0)) { $0 + w0.values[$1 * columns + j] * w0.values[$1 * columns + j] }
                    let after = (0..<rows).reduce(Float(0)) { $0 + w.values[$1 * columns + j] * w.values[$1 * columns + j] }
                    #expect(abs(after - before) <= 1e-4 * max(before, 1e-3), "\(algorithm) \(key) column \(j)")
                }
            }
            let info = try Self.run(["info", Self.networkFile(algorithm)])
            #expect(info.status == 0 && info.stdout.contains("oft_blocks") && info.stdout.contains("algorithms: \(algorithm) 5"))
        }
        // T-LoRA: LyCORIS wrote a 1×1 q_layer for the 3×3 conv1 (its forward crashes there):
        // that module is refused by name, the four others merge (their frozen term from W0's SVD).
        let out = directory.appendingPathComponent("tlora.safetensors").path
        let tlora = try Self.run(["merge", "--base", Self.networkFile("base"), "--adapter", Self.networkFile("tlora"), "--out", out])
        #expect(tlora.status == 0, "\(tlora.stderr)")
        #expect(tlora.stdout.contains("merged 4 modules"))
        #expect(tlora.stdout.contains("lycoris_down_blocks_0_resnets_0_conv1: tlora: q_layer.weight has shape [4, 8, 1, 1], expected [4, 8, 3, 3]"))
        let merged = try Self.readF32(out)
        let key = "down_blocks.0.attentions.0.proj_in.weight"
        #expect(zip(try #require(base[key]).values, try #require(merged[key]).values).contains { abs($0 - $1) > 1e-3 })
        #expect(merged["down_blocks.0.resnets.0.conv1.weight"]?.values == base["down_blocks.0.resnets.0.conv1.weight"]?.values)
    }

    @Test("demo trains, the loss falls, and the file it writes is described")
    func demo() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-demo-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("demo.safetensors").path
        let result = try Self.run(["demo", "--algo", "lokr", "--steps", "40", "--out", out])
        #expect(result.status == 0, "\(result.stderr)")
        let summary = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("loss ") })
        let numbers = summary.split(separator: " ").compactMap { Float($0.trimmingCharacters(in: .punctuationCharacters)) }
        #expect(numbers.count >= 2 && numbers[1] < numbers[0] * 0.8, "\(summary)")
        #expect(result.stdout.contains("algorithms: lokr 4"))
    }

    @Test("an unknown algorithm: exit 64, one error line naming the valid choices, then demo's own usage")
    func unknownAlgorithm() throws {
        let result = try Self.run(["demo", "--algo", "lorax", "--steps", "1"])
        #expect(result.status == 64)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.first == "Error: unknown algorithm 'lorax'; choose one of lora, locon, loha, lokr, ia3, dylora, norm")
        #expect(lines.dropFirst().first?.hasPrefix("Usage: lycoris demo [--algo <algo>]") == true, "\(result.stderr)")
        let steps = try Self.run(["demo", "--steps", "0"])
        #expect(steps.status == 64 && steps.stderr.contains("Error: --steps must be positive, got 0") && steps.stderr.contains("Usage: lycoris demo"))
    }

    @Test("a negative number is read as the option's value, so the validation names it (not 'Missing value')",
          arguments: [(["--steps", "-1"], "Error: --steps must be positive, got -1"),
                      (["--learning-rate", "-0.5"], "Error: --learning-rate must be a positive number, got -0.5"),
                      (["--threads", "-2"], "Error: --threads must be at least 1, got -2")])
    func negativeNumbers(_ arguments: [String], _ message: String) throws {
        let result = try Self.run(["demo"] + arguments)
        #expect(result.status == 64)
        #expect(result.stderr.split(separator: "\n").first.map(String.init) == message, "\(result.stderr)")
    }

    @Test("demo takes the names of make demo ALGO=, the kohya module and the server: lora, norm", arguments: ["lora", "NORM", "dylora"])
    func demoAlgorithmNames(_ name: String) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cli-demo-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("demo.safetensors").path
        let result = try Self.run(["demo", "--algo", name, "--steps", "30", "--out", out])
        #expect(result.status == 0, "\(result.stderr)")
        let expected = ["lora": "locon 4", "NORM": "norms 2", "dylora": "dylora 4"][name]!
        #expect(result.stdout.contains("algorithms: \(expected)"), "\(result.stdout)")
        let summary = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("loss ") })
        let numbers = summary.split(separator: " ").compactMap { Float($0.trimmingCharacters(in: .punctuationCharacters)) }
        #expect(numbers.count >= 2 && numbers[1] < numbers[0], "\(summary)")
    }

    @Test("demo's default file is not make demo's (neither overwrites the other)")
    func demoDefaultFile() throws {
        let help = try Self.run(["demo", "--help"])
        let flattened = help.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(flattened.contains("(default: lycoris-demo-adapter.safetensors)"), "\(help.stdout)")
        let makefile = try String(contentsOf: Self.testsDirectory.deletingLastPathComponent().appendingPathComponent("Makefile"), encoding: .utf8)
        #expect(makefile.contains("OUT ?= demo-adapter.safetensors"))
    }

    @Test("--version prints the version of the tools (the server's too)")
    func version() throws {
        let result = try Self.run(["--version"])
        #expect(result.status == 0 && result.stdout == "0.1.0\n", "\(result.stdout)\(result.stderr)")
    }

    @Test("a subcommand's usage error shows that subcommand's usage, exit 64")
    func subcommandUsage() throws {
        for (arguments, usage) in [(["merge", "--base", "x"], "Usage: lycoris merge --base <base>"), (["info"], "Usage: lycoris info <file>"),
                                   (["info", "a", "--bogus"], "Usage: lycoris info <file> [--json] [--wide]")] {
            let result = try Self.run(arguments)
            #expect(result.status == 64 && result.stderr.hasPrefix("Error: ") && result.stderr.contains(usage), "\(arguments): \(result.stderr)")
        }
    }

    @Test("info's table fits 100 columns: long names shortened in the middle, tensors wrapped; --wide shows them whole")
    func infoWidth() throws {
        let narrow = try Self.run(["info", Self.networkFile("norms")])
        #expect(narrow.status == 0)
        let lines = narrow.stdout.split(separator: "\n")
        #expect(lines.allSatisfy { $0.count <= 100 }, "\(lines.filter { $0.count > 100 })")
        #expect(narrow.stdout.contains("lycoris_down_blocks_0_…r_blocks_0_attn1_to_q locon"))
        #expect(!narrow.stdout.contains("lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"))
        let wide = try Self.run(["info", Self.networkFile("norms"), "--wide"])
        #expect(wide.stdout.contains("lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q locon"))
        #expect(wide.stdout.split(separator: "\n").contains { $0.count > 100 })
        #expect(wide.stdout.contains("lora_down.weight [4, 24], lora_up.weight [24, 4]"))
    }
}
