import Foundation
import LycorisCore
import LycorisTestSupport
@testable import LycorisFormats
import Testing

@Suite("safetensors writer")
struct WriterTests {
    /// The tensors of `golden_tensors()` in scripts/generate_safetensors_fixtures.py, in order.
    static func goldenWriter() throws -> SafetensorsWriter {
        var writer = SafetensorsWriter(metadata: [
            "ss_network_module": "lycoris.kohya",
            "format": "pt",
            "tricky": "quote \" backslash \\ newline \n tab \t ctrl \u{01} unicode é ✓ 😀",
        ])
        try writer.add("z.weight", Tensor(shape: [2, 3], scalars: [0x1p0, -0x1.8p1, 0x1.99999ap-4, 0, -0.0, 0x1.fffffep127]))
        try writer.add("a.bias", Tensor(shape: [7], scalars: [0x1.002p0, 0x1.006p0, 0x1.ffep15, 0x1.ffdfep15, 0x1p-25, 0x1.8p-24, -0x1.0000020p-25]),
                       as: .f16)
        try writer.add("m\"odd\\name\u{e9}", Tensor(shape: [2, 2], scalars: [0x1.01p0, 0x1.03p0, 0x1.fffffep127, -0x1.02p-130]), as: .bf16)
        try writer.add("scalar", Tensor(shape: [], scalars: [0x1.555556p-2]), as: .f64)
        try writer.add("on_input", int64: [1], shape: [])
        try writer.add("empty", Tensor(shape: [0, 4], scalars: []))
        return writer
    }

    @Test("output is byte-identical to the golden file that the reference Python reader accepted")
    func matchesGolden() throws {
        let golden = try Array(Data(contentsOf: Fixtures.url("swift_writer_golden.safetensors")))
        let writer = try Self.goldenWriter()
        #expect(try writer.serialized() == golden)

        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        try writer.write(to: directory.file("golden.safetensors"))
        #expect(try Array(Data(contentsOf: directory.file("golden.safetensors"))) == golden)
    }

    @Test("header starts with {\" and is padded with spaces to a multiple of 8")
    func headerLayout() throws {
        for writer in [try Self.goldenWriter(), SafetensorsWriter(), SafetensorsWriter(metadata: ["a": "b"])] {
            let bytes = writer.headerBytes()
            let length = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
            #expect(Int(length) == bytes.count - 8)
            #expect(length % 8 == 0)
            let json = Array(bytes[8...])
            let trimmed = json.reversed().drop { $0 == 0x20 }.reversed()
            #expect(trimmed.last == UInt8(ascii: "}"))
            #expect(json.count - trimmed.count < 8)
            if !writer.entries.isEmpty || !writer.metadata.isEmpty {
                #expect(Array(json.prefix(2)) == Array("{\"".utf8))
            }
        }
        #expect(Array(SafetensorsWriter().headerBytes()[8...]) == Array("{}      ".utf8), "no tensors, no metadata")
        var scalarOnly = SafetensorsWriter()
        try scalarOnly.add("s", Tensor(shape: [], scalars: [1]))
        let text = String(decoding: scalarOnly.headerBytes()[8...], as: UTF8.self)
        #expect(text.hasPrefix("{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}"), "no __metadata__ when empty; [] for 0-dim")
    }

    @Test("F32/F16/BF16/F64 round trip through a file with metadata, in the caller's order", arguments: [DType.f32, .f16, .bf16, .f64])
    func roundTrip(_ dtype: DType) throws {
        var generator = SplitMix64(state: 42)
        let big = (0..<300_000).map { _ in Float(bitPattern: UInt32(truncatingIfNeeded: generator.next())) }  // > one 1 MiB chunk
        let small: [Float] = [0, -0.0, 1, -1, 0.1, 1e-30, 3e38, .infinity, -.infinity, .nan, 65520, 0x1p-25]
        var writer = SafetensorsWriter(metadata: ["format": "pt", "dtype": dtype.rawValue, "empty": ""])
        try writer.add("zeta", Tensor(shape: [2, 6], scalars: small), as: dtype)
        try writer.add("alpha", Tensor(shape: [300, 1000], scalars: big), as: dtype)
        try writer.add("scalar", Tensor(shape: [], scalars: [0.25]), as: dtype)

        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("round trip \(dtype).safetensors")
        try writer.write(to: url)
        #expect(try directory.contents() == [url.lastPathComponent], "no temporary file left behind")

        let file = try SafetensorsFile(contentsOf: url)
        #expect(file.metadata == writer.metadata)
        #expect(file.tensorNames == ["zeta", "alpha", "scalar"])
        #expect(file.header.headerLength % 8 == 0)
        for (name, values) in [("zeta", small), ("alpha", big), ("scalar", [Float(0.25)])] {
            let info = try #require(file.info(name))
            #expect(info.dtype == dtype)
            let expected = try encodeFloats(values, as: dtype).withUnsafeBytes { decodeFloats($0, as: dtype) }
            let got = try file.tensor(name).scalars
            #expect(got.count == expected.count)
            let mismatches = zip(got, expected).filter { $0.bitPattern != $1.bitPattern && !($0.isNaN && $1.isNaN) }
            #expect(mismatches.isEmpty, "\(name): \(mismatches.prefix(3))")
            if dtype == .f32 {
                #expect(got.map(\.bitPattern) == values.map(\.bitPattern), "F32 is bit-exact")
            }
        }
        #expect(try file.tensor("scalar").shape == [])
        #expect(try file.tensor("alpha").shape == [300, 1000])
    }

    @Test("raw entries of any dtype, e.g. a 0-dim I64, and escaped names round trip")
    func rawEntries() throws {
        var writer = SafetensorsWriter()
        try writer.add("on_input", int64: [1], shape: [])
        try writer.addRaw("mask", dtype: .bool, shape: [3], bytes: [1, 0, 1])
        try writer.addRaw("f8", dtype: .f8e4m3, shape: [2], bytes: [0x38, 0x7E])
        try writer.add("weird \"name\"\\\n\t\u{7}/é", int64: [-5, 6], shape: [2, 1])
        let bytes = try writer.serialized()
        let header = try bytes.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
        #expect(header.tensors.map(\.name) == ["on_input", "mask", "f8", "weird \"name\"\\\n\t\u{7}/é"])
        #expect(header.tensors.map(\.dtype) == [.i64, .bool, .f8e4m3, .i64])
        #expect(header.tensors[0].shape == [])
        let text = String(decoding: bytes[8..<(8 + header.headerLength)], as: UTF8.self)
        #expect(text.contains(#""weird \"name\"\\\n\t\u0007/é""#))

        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("raw.safetensors")
        try writer.write(to: url)
        let file = try SafetensorsFile(contentsOf: url)
        #expect(try file.rawBytes("on_input") == [1, 0, 0, 0, 0, 0, 0, 0])
        #expect(try file.tensor("mask").scalars == [1, 0, 1])
        #expect(try file.tensor("f8").scalars == [1, 448])
        #expect(try file.tensor("weird \"name\"\\\n\t\u{7}/é") == Tensor(shape: [2, 1], scalars: [-5, 6]))
    }

    @Test("invalid entries are refused with an error naming the tensor")
    func invalidEntries() throws {
        var writer = SafetensorsWriter()
        try writer.add("a", Tensor(shape: [1], scalars: [1]))
        let cases: [(String, (inout SafetensorsWriter) throws -> Void)] = [
            ("already added", { try $0.add("a", Tensor(shape: [1], scalars: [2])) }),
            ("reserved", { try $0.add("__metadata__", Tensor(shape: [1], scalars: [2])) }),
            ("cannot be encoded", { try $0.add("b", Tensor(shape: [1], scalars: [2]), as: .i8) }),
            ("needs 8 bytes, but 4", { try $0.addRaw("c", dtype: .i64, shape: [], bytes: [0, 0, 0, 0]) }),
            ("negative dimension", { try $0.addRaw("d", dtype: .u8, shape: [-1], bytes: []) }),
            ("more than Int.max", { try $0.addRaw("e", dtype: .f32, shape: [1 << 61, 2], bytes: []) }),
            ("too many elements", { try $0.addRaw("f", dtype: .u8, shape: [1 << 62, 1 << 62], bytes: []) }),
        ]
        for (message, add) in cases {
            let error = try #require(throws: SafetensorsError.self) { try add(&writer) }
            #expect(error.rule == "invalid tensor entry")
            #expect(error.description.contains(message), "\(error)")
            #expect(error.tensorName != nil)
        }
        #expect(writer.entries.map(\.name) == ["a"], "failed adds change nothing")
    }

    @Test("writing replaces an existing file atomically and leaves no temporary file")
    func replacesExisting() throws {
        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("model.safetensors")
        try Data("old contents".utf8).write(to: url)
        try writeSafetensors([("w", Tensor(shape: [2], scalars: [1, 2]))], metadata: ["k": "v"], dtype: .bf16, to: url)
        #expect(try directory.contents() == ["model.safetensors"])
        let file = try SafetensorsFile(contentsOf: url)
        #expect(file.metadata == ["k": "v"])
        #expect(file.info("w")?.dtype == .bf16)
        #expect(try file.tensor("w").scalars == [1, 2])
    }

    /// The golden tensors again, each one streamed: floats encoded by `streamFloats` in the
    /// producer, raw bytes passed in two pieces.
    static func streamedGoldenWriter() throws -> SafetensorsWriter {
        let golden = try goldenWriter()
        var writer = SafetensorsWriter(metadata: golden.metadata)
        for entry in golden.entries {
            switch entry.payload {
            case .floats(let values):
                try writer.addStreamed(entry.name, dtype: entry.dtype, shape: entry.shape) { sink in
                    try SafetensorsWriter.streamFloats(values, as: entry.dtype, into: sink)
                }
            case .raw(let bytes):
                try writer.addStreamed(entry.name, dtype: entry.dtype, shape: entry.shape) { sink in
                    try bytes.withUnsafeBytes { all in
                        try sink(UnsafeRawBufferPointer(rebasing: all[..<(all.count / 2)]))
                        try sink(UnsafeRawBufferPointer(rebasing: all[(all.count / 2)...]))
                    }
                }
            case .streamed:
                Issue.record("the golden writer holds its data")
            }
        }
        return writer
    }

    @Test("streamed entries write the same bytes as the golden file, produced in entry order")
    func streamedMatchesGolden() throws {
        let golden = try Array(Data(contentsOf: Fixtures.url("swift_writer_golden.safetensors")))
        #expect(try Self.streamedGoldenWriter().serialized() == golden)
        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("streamed.safetensors")
        try Self.streamedGoldenWriter().write(to: url)
        #expect(try Array(Data(contentsOf: url)) == golden)
        // Producers run once each, in the order added.
        final class Order: @unchecked Sendable { var names: [String] = [] }
        let order = Order()
        var writer = SafetensorsWriter()
        for name in ["b", "a", "c"] {
            try writer.addStreamed(name, dtype: .f32, shape: [1]) { sink in
                order.names.append(name)
                try SafetensorsWriter.streamFloats([1], as: .f32, into: sink)
            }
        }
        _ = try writer.serialized()
        #expect(order.names == ["b", "a", "c"])
    }

    @Test("a producer that throws or passes the wrong byte count fails the write; the target is untouched",
          arguments: [0, 1, 2])
    func streamedFailure(_ kind: Int) throws {
        struct Refused: Error {}
        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("model.safetensors")
        try Data("old contents".utf8).write(to: url)
        var writer = SafetensorsWriter()
        try writer.add("first", Tensor(shape: [2], scalars: [1, 2]))
        try writer.addStreamed("w", dtype: .f16, shape: [3]) { sink in
            switch kind {
            case 0: throw Refused()
            case 1: try SafetensorsWriter.streamFloats([1, 2], as: .f16, into: sink)
            default: try SafetensorsWriter.streamFloats([1, 2, 3, 4], as: .f16, into: sink)
            }
        }
        if kind == 0 {
            #expect(throws: Refused.self) { try writer.write(to: url) }
        } else {
            let error = try #require(throws: SafetensorsError.self) { try writer.write(to: url) }
            #expect("\(error)".contains("w") && "\(error)".contains("6"), "names the tensor and its byte count: \(error)")
        }
        #expect(try directory.contents() == ["model.safetensors"])
        #expect(try Data(contentsOf: url) == Data("old contents".utf8))
    }

    @Test("a failure at any step removes the temporary file and leaves the target untouched",
          arguments: [SafetensorsWriter.WriteStep.afterCreatingTemporary, .afterWritingData, .beforeRename])
    func injectedFailure(_ step: SafetensorsWriter.WriteStep) throws {
        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let url = directory.file("model.safetensors")
        try Data("old contents".utf8).write(to: url)
        let writer = try Self.goldenWriter()
        let error = try #require(throws: SafetensorsError.self) { try writer.write(toPath: url.path, failingAt: step) }
        #expect(error.rule == "write failed")
        #expect(error.path == url.path)
        #expect(try directory.contents() == ["model.safetensors"])
        #expect(try Data(contentsOf: url) == Data("old contents".utf8))
    }

    @Test("an unwritable or missing directory gives a clear error naming the path, and nothing is left behind")
    func unwritableDirectory() throws {
        let writer = try Self.goldenWriter()
        let missing = "/nonexistent-lycoris-dir/sub/model.safetensors"
        let error = try #require(throws: SafetensorsError.self) { try writer.write(toPath: missing) }
        #expect(error.path == missing)
        #expect(error.description.contains(missing))
        #expect(error.description.contains("creating a temporary file in directory '/nonexistent-lycoris-dir/sub'"))
        #expect(error.description.contains("No such file or directory"))

        // A directory nobody can create files in (root included): /proc on Linux; elsewhere a
        // directory with its write permission removed (these tests do not run as root on macOS).
        #if os(Linux)
        let readOnly = "/proc/lycoris-model.safetensors"
        let denied = try #require(throws: SafetensorsError.self) { try writer.write(toPath: readOnly) }
        #expect(denied.path == readOnly)
        #expect(denied.description.contains("creating a temporary file in directory '/proc'"))
        #expect(!FileManager.default.fileExists(atPath: readOnly))
        #else
        let directory = try TemporaryDirectory()
        defer {
            try? FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: directory.url.path)
            directory.cleanUp()
        }
        let url = directory.file("model.safetensors")
        try Data("old contents".utf8).write(to: url)
        try FileManager.default.setAttributes([.posixPermissions: 0o555], ofItemAtPath: directory.url.path)
        let denied = try #require(throws: SafetensorsError.self) { try writer.write(to: url) }
        #expect(denied.description.contains("Permission denied"))
        #expect(try directory.contents() == ["model.safetensors"])
        #expect(try Data(contentsOf: url) == Data("old contents".utf8))
        #endif
    }

    @Test("a rename that fails (the target is a non-empty directory) cleans up and changes nothing")
    func renameFailure() throws {
        let directory = try TemporaryDirectory()
        defer { directory.cleanUp() }
        let target = directory.file("model.safetensors")
        try FileManager.default.createDirectory(at: target, withIntermediateDirectories: false)
        try Data("keep".utf8).write(to: target.appendingPathComponent("inside"))
        let error = try #require(throws: SafetensorsError.self) { try Self.goldenWriter().write(to: target) }
        #expect(error.description.contains("renaming the temporary file over the target failed"))
        #expect(try directory.contents() == ["model.safetensors"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: target.path) == ["inside"])
        #expect(throws: SafetensorsError.self) { try SafetensorsWriter().write(toPath: directory.url.path + "/") }
    }
}
