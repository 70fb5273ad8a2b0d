import Foundation
import LycorisCore
import LycorisFormats
import Testing

/// `Fixtures/expected.json`, written by `scripts/generate_safetensors_fixtures.py` from what
/// numpy / ml_dtypes / the reference `safetensors` package say each valid fixture holds.
struct ExpectedFile: Decodable {
    struct Tensor: Decodable {
        var name: String
        var dtype: String
        var shape: [Int]
        // swiftlint:disable:next identifier_name
        var f32_bits: [UInt32]
    }
    var metadata: [String: String]
    var tensors: [Tensor]

    static func load() throws -> [String: ExpectedFile] {
        let data = try Data(contentsOf: Fixtures.url("expected.json"))
        return try JSONDecoder().decode([String: ExpectedFile].self, from: data)
    }
}

@Suite("safetensors reader")
struct ReaderTests {
    static let validFiles = [
        "dtype_F64.safetensors", "dtype_F32.safetensors", "dtype_F16.safetensors", "dtype_BF16.safetensors",
        "dtype_I64.safetensors", "dtype_I32.safetensors", "dtype_I16.safetensors", "dtype_I8.safetensors",
        "dtype_U8.safetensors", "dtype_BOOL.safetensors", "dtype_F8_E4M3.safetensors", "dtype_F8_E5M2.safetensors",
        "metadata.safetensors", "scalar.safetensors", "zero_size.safetensors", "empty.safetensors",
        "unaligned.safetensors", "extra_fields.safetensors",
    ]

    @Test("expected.json covers exactly the valid fixtures")
    func expectationsCoverFixtures() throws {
        let expected = try ExpectedFile.load()
        #expect(Set(expected.keys) == Set(Self.validFiles))
        let onDisk = try Fixtures.names().filter { $0.hasSuffix(".safetensors") && !$0.hasPrefix("bad_") }
        #expect(Set(onDisk) == Set(Self.validFiles + ["swift_writer_golden.safetensors"]))
    }

    @Test("valid fixture decodes bit-exactly to the values numpy / ml_dtypes give", arguments: validFiles)
    func decodesFixture(_ name: String) throws {
        let expected = try #require(try ExpectedFile.load()[name])
        let file = try SafetensorsFile(contentsOf: Fixtures.url(name))
        #expect(file.metadata == expected.metadata)
        #expect(file.tensorNames == expected.tensors.map(\.name))
        var offset = 0
        for want in expected.tensors {
            let info = try #require(file.info(want.name))
            #expect(info.dtype.rawValue == want.dtype)
            #expect(info.shape == want.shape)
            #expect(info.byteRange.lowerBound == offset, "tensors are contiguous from 0")
            offset = info.byteRange.upperBound
            #expect(info.elementCount == want.shape.reduce(1, *))
            #expect(info.byteCount == info.elementCount * info.dtype.byteSize)

            let tensor = try file.tensor(want.name)
            #expect(tensor.shape == want.shape)
            let got = tensor.scalars.map(\.bitPattern)
            #expect(got.count == want.f32_bits.count)
            for (index, (g, w)) in zip(got, want.f32_bits).enumerated() where g != w {
                Issue.record("\(name) \(want.name)[\(index)]: got 0x\(String(g, radix: 16)) (\(Float(bitPattern: g))), expected 0x\(String(w, radix: 16)) (\(Float(bitPattern: w)))")
            }
            let rawCount = try file.withRawBytes(want.name) { $0.count }
            #expect(rawCount == info.byteCount)
        }
        #expect(file.fileSize == file.header.fileSize, "the header describes the whole file")
        #expect(file.header.dataStart == 8 + file.header.headerLength)
    }

    @Test("F8 fixtures hold all 256 patterns and decode like ml_dtypes")
    func f8Tables() throws {
        for (name, decode) in [("dtype_F8_E4M3.safetensors", FloatConversion.float(fromF8E4M3Bits:)),
                               ("dtype_F8_E5M2.safetensors", FloatConversion.float(fromF8E5M2Bits:))] {
            let file = try SafetensorsFile(contentsOf: Fixtures.url(name))
            let raw = try file.rawBytes("values")
            #expect(raw == Array(0...255))
            let expected = try #require(try ExpectedFile.load()[name]?.tensors.first)
            #expect(raw.map { decode($0).bitPattern } == expected.f32_bits)
        }
    }

    @Test("metadata, 0-dim scalars and zero-size tensors")
    func specialShapes() throws {
        let meta = try SafetensorsFile(contentsOf: Fixtures.url("metadata.safetensors"))
        #expect(meta.metadata["format"] == "pt")
        #expect(meta.metadata["unicode"] == "é ✓ \"quoted\" \\ \n")
        #expect(try meta.tensor("weight") == Tensor(shape: [2, 3], scalars: [0, 1, 2, 3, 4, 5]))

        let scalar = try SafetensorsFile(contentsOf: Fixtures.url("scalar.safetensors"))
        #expect(try scalar.tensor("alpha") == Tensor(shape: [], scalars: [4]))
        #expect(scalar.info("on_input")?.dtype == .i64)
        #expect(scalar.info("on_input")?.shape == [])
        #expect(try scalar.rawBytes("on_input") == [1, 0, 0, 0, 0, 0, 0, 0])
        #expect(try scalar.tensor("on_input") == Tensor(shape: [], scalars: [1]))

        let zero = try SafetensorsFile(contentsOf: Fixtures.url("zero_size.safetensors"))
        let empty = try #require(zero.info("empty"))
        #expect(empty.shape == [0, 3])
        #expect(empty.byteRange.isEmpty)
        #expect(try zero.tensor("empty") == Tensor(shape: [0, 3], scalars: []))
        #expect(try zero.tensor("after").scalars == [7])

        let none = try SafetensorsFile(contentsOf: Fixtures.url("empty.safetensors"))
        #expect(none.tensors.isEmpty)
        #expect(none.metadata.isEmpty)
    }

    @Test("an unknown tensor name throws an error naming it and the file")
    func unknownTensor() throws {
        let path = try Fixtures.path("scalar.safetensors")
        let file = try SafetensorsFile(path: path)
        #expect(file.info("nope") == nil)
        #expect(!file.contains("nope") && file.contains("alpha"))
        let error = try #require(throws: SafetensorsError.self) { try file.tensor("nope") }
        #expect(error == .tensorNotFound(path: path, name: "nope"))
        #expect(error.description.contains("\"nope\"") && error.description.contains(path))
        #expect(throws: SafetensorsError.tensorNotFound(path: path, name: "x")) {
            try file.withRawBytes("x") { _ in 0 }
        }
    }

    @Test("a missing file and a directory give clear errors naming the path")
    func openErrors() throws {
        let missing = "/nonexistent-lycoris-dir/model.safetensors"
        let error = try #require(throws: SafetensorsError.self) { try SafetensorsFile(path: missing) }
        guard case .cannotOpen(let path, let reason) = error else {
            Issue.record("unexpected \(error)")
            return
        }
        #expect(path == missing)
        #expect(reason.contains("No such file"))
        #expect(error.description.contains(missing))

        let directory = try Fixtures.directory().path
        #expect(throws: SafetensorsError.notARegularFile(path: directory)) { try SafetensorsFile(path: directory) }
    }

    @Test("a file can be read from many tasks at once")
    func concurrentReads() async throws {
        let file = try SafetensorsFile(contentsOf: Fixtures.url("dtype_F8_E4M3.safetensors"))
        let sums = await withTaskGroup(of: Float.self) { group in
            for _ in 0..<16 {
                group.addTask { (try? file.tensor("values").scalars.filter(\.isFinite).reduce(0, +)) ?? .nan }
            }
            var results: [Float] = []
            for await sum in group { results.append(sum) }
            return results
        }
        #expect(sums.count == 16)
        #expect(Set(sums.map(\.bitPattern)).count == 1)
    }

    @Test("validate(file:) works on an in-memory buffer")
    func inMemory() throws {
        let bytes = try Array(Data(contentsOf: Fixtures.url("metadata.safetensors")))
        let header = try bytes.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
        #expect(header.tensors.map(\.name).sorted() == ["bias", "weight"])
        #expect(header.fileSize == bytes.count)
        #expect(header.headerLength % 8 == 0)
    }
}
