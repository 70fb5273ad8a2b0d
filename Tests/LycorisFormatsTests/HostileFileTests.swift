import Foundation
import LycorisCore
import LycorisTestSupport
import LycorisFormats
import Testing

/// One hostile fixture and what its rejection must say.
struct HostileCase: Sendable, CustomTestStringConvertible {
    var file: String
    /// ``SafetensorsError/rule``.
    var rule: String
    /// The tensor (or nil) the error must name.
    var tensor: String?
    /// Substrings the description must contain.
    var details: [String]

    var testDescription: String { file }
}

@Suite("safetensors reader rejects hostile files")
struct HostileFileTests {
    static let cases: [HostileCase] = [
        // Rules 1-3: the length prefix.
        .init(file: "bad_header_too_small.safetensors", rule: "header too small", details: ["5 bytes"]),
        .init(file: "bad_empty_file.safetensors", rule: "header too small", details: ["0 bytes"]),
        .init(file: "bad_header_too_large_2_63.safetensors", rule: "header too large", details: ["9223372036854775808"]),
        .init(file: "bad_header_too_large_100000001.safetensors", rule: "header too large", details: ["100000001"]),
        .init(file: "bad_header_length_past_eof.safetensors", rule: "invalid header length", details: ["1000", "past the end"]),
        // Rule 4: UTF-8, JSON, schema.
        .init(file: "bad_invalid_utf8.safetensors", rule: "invalid header (not valid UTF-8)", details: ["offset 3"]),
        .init(file: "bad_header_not_object.safetensors", rule: "invalid header deserialization", details: ["an array, not a JSON object"]),
        .init(file: "bad_truncated_json.safetensors", rule: "invalid header deserialization", details: ["unexpected end of JSON input"]),
        .init(file: "bad_trailing_characters.safetensors", rule: "invalid header deserialization", details: ["trailing characters"]),
        .init(file: "bad_deep_nesting.safetensors", rule: "invalid header deserialization", details: ["nesting deeper than 128"]),
        .init(file: "bad_duplicate_tensor_key.safetensors", rule: "invalid header deserialization", details: ["duplicate key \"a\""]),
        .init(file: "bad_duplicate_field.safetensors", rule: "invalid header deserialization", tensor: "a", details: ["duplicate key \"dtype\""]),
        .init(file: "bad_negative_shape.safetensors", rule: "invalid header deserialization", tensor: "a",
              details: ["shape element 0 is a negative number (-1)"]),
        .init(file: "bad_float_shape.safetensors", rule: "invalid header deserialization", tensor: "a",
              details: ["shape element 0 is a non-integer number (2.0)"]),
        .init(file: "bad_unknown_dtype.safetensors", rule: "invalid header deserialization", tensor: "a", details: ["unknown dtype \"F17\""]),
        .init(file: "bad_dtype_not_string.safetensors", rule: "invalid header deserialization", tensor: "a", details: ["dtype is", "not a string"]),
        .init(file: "bad_entry_not_object.safetensors", rule: "invalid header deserialization", tensor: "a", details: ["is an array, not an object"]),
        .init(file: "bad_missing_data_offsets.safetensors", rule: "invalid header deserialization", tensor: "a",
              details: ["missing field \"data_offsets\""]),
        .init(file: "bad_three_data_offsets.safetensors", rule: "invalid header deserialization", tensor: "a", details: ["has 3 elements"]),
        .init(file: "bad_negative_data_offset.safetensors", rule: "invalid header deserialization", tensor: "a",
              details: ["data_offsets[0] is a negative number (-4)"]),
        .init(file: "bad_data_offset_above_u64.safetensors", rule: "invalid header deserialization", tensor: "a",
              details: ["too large for 64 bits (18446744073709551616)"]),
        .init(file: "bad_metadata_non_string_value.safetensors", rule: "invalid header deserialization",
              details: ["\"__metadata__\"", "\"epochs\"", "not a string"]),
        .init(file: "bad_metadata_not_object.safetensors", rule: "invalid header deserialization",
              details: ["\"__metadata__\"", "metadata is a string, not an object"]),
        // Rule 5: offsets.
        .init(file: "bad_overlapping_offsets.safetensors", rule: "invalid offset", tensor: "b", details: ["[8, 24]", "must begin at 16"]),
        .init(file: "bad_hole_between_tensors.safetensors", rule: "invalid offset", tensor: "b", details: ["[12, 20]", "must begin at 8"]),
        .init(file: "bad_offsets_not_starting_at_zero.safetensors", rule: "invalid offset", tensor: "a", details: ["[4, 12]", "must begin at 0"]),
        .init(file: "bad_offsets_end_before_begin.safetensors", rule: "invalid offset", tensor: "b", details: ["[8, 4]", "end before they begin"]),
        // Rule 6: sizes.
        .init(file: "bad_shape_product_overflow.safetensors", rule: "validation overflow", tensor: "a",
              details: ["[4611686018427387904, 4611686018427387904]", "overflows"]),
        .init(file: "bad_byte_size_overflow.safetensors", rule: "validation overflow", tensor: "a", details: ["F32", "overflows"]),
        .init(file: "bad_size_mismatch.safetensors", rule: "tensor invalid info", tensor: "a",
              details: ["needs 16 bytes", "span 12 bytes", "size mismatch"]),
        // Rule 7: the file's end.
        .init(file: "bad_end_offset_overflow.safetensors", rule: "validation overflow", tensor: "a", details: ["18446744073709551615"]),
        .init(file: "bad_truncated_buffer.safetensors", rule: "metadata incomplete buffer", details: ["tensor data truncated"]),
        .init(file: "bad_trailing_bytes.safetensors", rule: "metadata incomplete buffer", details: ["trailing bytes"]),
    ]

    @Test("every bad_* fixture has a case here")
    func allHostileFixturesCovered() throws {
        let onDisk = try Fixtures.names().filter { $0.hasPrefix("bad_") }
        #expect(Set(onDisk) == Set(Self.cases.map(\.file)))
        #expect(Self.cases.count == onDisk.count, "no duplicate cases")
    }

    @Test("hostile file throws a SafetensorsError naming the rule, the file and the tensor", arguments: cases)
    func rejects(_ hostile: HostileCase) throws {
        let path = try Fixtures.path(hostile.file)
        let error = try #require(throws: SafetensorsError.self) { try SafetensorsFile(path: path) }
        #expect(error.rule == hostile.rule, "\(error)")
        #expect(error.path == path)
        #expect(error.description.contains(path))
        #expect(error.description.contains(hostile.rule))
        if let tensor = hostile.tensor {
            #expect(error.tensorName == tensor, "\(error)")
            #expect(error.description.contains("\"\(tensor)\""), "\(error)")
        }
        for detail in hostile.details {
            #expect(error.description.contains(detail), "\(error.description) should contain \(detail)")
        }
        // The in-memory validator agrees.
        let bytes = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        let memoryError = try #require(throws: SafetensorsError.self) {
            try bytes.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
        }
        #expect(memoryError.rule == hostile.rule)
    }

    // MARK: In-memory hostile headers

    /// 8-byte length + `header` + `data`.
    static func file(_ header: [UInt8], data: [UInt8] = []) -> [UInt8] {
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { Array($0) } + header + data
    }

    static func validate(_ bytes: [UInt8]) throws -> SafetensorsHeader {
        try bytes.withUnsafeBytes { try SafetensorsHeader.validate(file: $0) }
    }

    @Test("a million nested brackets or objects are rejected without exhausting the stack")
    func deepNesting() throws {
        for header in [[UInt8](repeating: UInt8(ascii: "["), count: 1_000_000),
                       Array(String(repeating: "{\"a\":", count: 200_000).utf8)] {
            let error = try #require(throws: SafetensorsError.self) { try Self.validate(Self.file(header)) }
            #expect(error.description.contains("nesting deeper than 128"))
        }
        // 128 levels are fine for the parser (the schema then rejects it).
        let ok = Array(("{\"a\":" + String(repeating: "[", count: 127) + String(repeating: "]", count: 127) + "}").utf8)
        let error = try #require(throws: SafetensorsError.self) { try Self.validate(Self.file(ok)) }
        #expect(error.description.contains("not an object with dtype"))
    }

    @Test("JSON syntax corner cases", arguments: [
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", "leading zero"),
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,],\"data_offsets\":[0,4]}}", "where a JSON value was expected"),
        ("{\"a\":{\"dtype\":\"F32\"\"shape\":[1]}}", "expected ',' or '}'"),
        ("{'a':1}", "where an object key was expected"),
        ("{\"a\":{\"dtype\":\"F\\u0033\\u00322\",\"shape\":[1],\"data_offsets\":[0,4]},}", "where an object key was expected"),
        ("{\"\\ud800\":1}", "lone leading surrogate"),
        ("{\"\\udc00\":1}", "lone trailing surrogate"),
        ("{\"\\x\":1}", "invalid escape"),
        ("{\"a\tb\":1}", "control character"),
        ("{\"a\":tru}", "invalid literal"),
        ("{\"a\":1e}", "expected a digit after an exponent"),
        ("{\"a\":-}", "expected a digit"),
        ("", "unexpected end of JSON input"),
        ("   ", "unexpected end of JSON input"),
        ("{\"__metadata__\":{\"k\":\"v\",\"k\":\"w\"}}", "duplicate key \"k\""),
        ("\u{FEFF}{}", "where a JSON value was expected"),
    ])
    func jsonCorners(_ header: String, _ message: String) throws {
        let error = try #require(throws: SafetensorsError.self) { try Self.validate(Self.file(Array(header.utf8))) }
        #expect(error.rule == "invalid header deserialization")
        #expect(error.description.contains(message), "\(error)")
    }

    @Test("lenient where the reference is: whitespace, escapes, extra fields, null metadata, unpadded header")
    func acceptedVariants() throws {
        let header = " \n{ \"__metadata__\" : null , \"w\\u00e9\\n\" : { \"data_offsets\" : [ 0 , 4 ] , \"shape\" : [ 1 ] , "
            + "\"dtype\" : \"F\\u0033\\u0032\", \"x\": {\"y\": [true, false, null, -1.5e3, \"s\"]} } }\t\r\n"
        let parsed = try Self.validate(Self.file(Array(header.utf8), data: [0, 0, 128, 63]))
        #expect(parsed.metadata.isEmpty)
        #expect(parsed.tensors == [TensorInfo(name: "wé\n", dtype: .f32, shape: [1], byteRange: 0..<4)])
        // Surrogate pairs decode to one scalar.
        let emoji = try Self.validate(Self.file(Array("{\"__metadata__\":{\"\\ud83d\\ude00\":\"\"}}".utf8)))
        #expect(emoji.metadata == ["😀": ""])
        // Zero-size tensors may share an offset; ties keep header order.
        let zeros = try Self.validate(Self.file(Array(
            "{\"b\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[0,0]},\"a\":{\"dtype\":\"I8\",\"shape\":[0,9],\"data_offsets\":[0,0]}}".utf8)))
        #expect(zeros.tensors.map(\.name) == ["b", "a"])
        // Tensors listed out of offset order are sorted by offset.
        let sorted = try Self.validate(Self.file(Array(
            "{\"second\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},\"first\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}".utf8),
            data: [1, 2]))
        #expect(sorted.tensors.map(\.name) == ["first", "second"])
    }

    @Test("a zero-element tensor with a dimension beyond Int.max is reported, not trapped on")
    func hugeDimensionInEmptyTensor() throws {
        let header = Array("{\"a\":{\"dtype\":\"F32\",\"shape\":[0,9223372036854775808],\"data_offsets\":[0,0]}}".utf8)
        let error = try #require(throws: SafetensorsError.self) { try Self.validate(Self.file(header)) }
        #expect(error.rule == "validation overflow")
        let fine = try Self.validate(Self.file(Array("{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4611686018427387904,4],\"data_offsets\":[0,0]}}".utf8)))
        #expect(fine.tensors.first?.shape == [0, 4_611_686_018_427_387_904, 4])
    }

    @Test("random corruptions of valid files never crash the reader")
    func fuzz() throws {
        var generator = SplitMix64(state: 0xF022)
        let seeds = try ["metadata.safetensors", "scalar.safetensors", "unaligned.safetensors", "dtype_F16.safetensors"]
            .map { try Array(Data(contentsOf: Fixtures.url($0))) }
        var accepted = 0
        var rejected = 0
        for iteration in 0..<20_000 {
            var bytes = seeds[iteration % seeds.count]
            switch generator.next() % 4 {
            case 0:  // flip a few bytes
                for _ in 0..<(1 + generator.next() % 3) {
                    let index = Int(generator.next() % UInt64(bytes.count))
                    bytes[index] = UInt8(truncatingIfNeeded: generator.next())
                }
            case 1:  // truncate
                bytes.removeLast(Int(generator.next() % UInt64(bytes.count)))
            case 2:  // append garbage
                bytes += (0..<(1 + generator.next() % 16)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            default:  // overwrite one header byte with a JSON-significant character
                let specials = Array("{}[]\",:-0123456789e.\\ ".utf8)
                let index = 8 + Int(generator.next() % UInt64(max(1, min(bytes.count, 200) - 8)))
                if index < bytes.count { bytes[index] = specials[Int(generator.next() % UInt64(specials.count))] }
            }
            do {
                let header = try Self.validate(bytes)
                accepted += 1
                // Anything accepted must be internally consistent.
                #expect(header.fileSize == bytes.count)
                for info in header.tensors {
                    #expect(info.shape.reduce(1, *) == info.elementCount, "accepted shapes never overflow left to right")
                    let scalars = bytes.withUnsafeBytes {
                        decodeFloats(UnsafeRawBufferPointer(rebasing: $0[(header.dataStart + info.byteRange.lowerBound)..<(header.dataStart + info.byteRange.upperBound)]), as: info.dtype)
                    }
                    #expect(scalars.count == info.elementCount)
                }
            } catch is SafetensorsError {
                rejected += 1
            }
        }
        #expect(accepted + rejected == 20_000)
        #expect(rejected > 0 && accepted > 0)
    }
}
