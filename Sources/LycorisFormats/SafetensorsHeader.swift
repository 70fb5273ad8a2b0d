import LycorisCore

/// The validated header of a safetensors file.
///
/// ## Layout
/// ```
/// [8 bytes: N, little-endian UInt64] [N bytes: UTF-8 JSON header] [data buffer]
/// ```
/// The JSON is an object; each key except `__metadata__` names a tensor:
/// `"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}` with the offsets
/// relative to the start of the data buffer, end exclusive. The optional
/// `"__metadata__": {"key": "value", ...}` maps strings to strings.
///
/// ## Rules (checked in this order, as the reference Rust implementation does)
/// 1. The file is at least 8 bytes long. → ``SafetensorsError/headerTooSmall(path:fileSize:)``
/// 2. N ≤ 100,000,000. → ``SafetensorsError/headerTooLarge(path:headerLength:)``
/// 3. 8 + N does not overflow and is ≤ the file size. → ``SafetensorsError/invalidHeaderLength(path:headerLength:fileSize:)``
/// 4. The N bytes are valid UTF-8 (→ ``SafetensorsError/invalidHeaderUTF8(path:byteOffset:)``) and
///    one strict JSON object (see `HeaderJSONParser`: no duplicate keys at any level, nesting at most
///    128 deep) in which every tensor entry is an object with a string `dtype` naming a ``DType``, a
///    `shape` array of non-negative integers, and a `data_offsets` array of exactly two non-negative
///    integers (other fields are ignored, as the reference does), and `__metadata__`, when present
///    and not null, is an object of string values.
///    → ``SafetensorsError/invalidHeaderDeserialization(path:key:reason:)`` naming the key.
/// 5. Tensors sorted by `data_offsets` (ties keep header order): the first begins at 0, each begins
///    where the previous ended, and none ends before it begins. So overlaps, holes and ranges not
///    starting at 0 are all rejected. → ``SafetensorsError/invalidOffset(path:tensor:begin:end:expectedBegin:)``
/// 6. prod(shape) × element size, with every multiplication checked for overflow in shape order
///    (→ ``SafetensorsError/shapeOverflow(path:tensor:shape:dtype:)``), equals end − begin
///    (→ ``SafetensorsError/tensorSizeMismatch(path:tensor:shape:dtype:expectedBytes:actualBytes:)``).
///    Rules 5 and 6 are checked tensor by tensor, so the first bad tensor in offset order is reported.
/// 7. 8 + N + (end of the last tensor; 0 when there are none) does not overflow
///    (→ ``SafetensorsError/bufferEndOverflow(path:tensor:end:)``, as the current reference (safetensors 0.8) checks) and
///    equals the file size exactly: no trailing bytes, no truncated buffer.
///    → ``SafetensorsError/incompleteBuffer(path:expectedFileSize:fileSize:)``
///
/// Where rule 2 or 3 fails and the first bytes show another kind of file (text, a ZIP archive
/// such as `torch.save` writes, a pickle, a PNG, GGUF), the error is
/// ``SafetensorsError/notSafetensors(path:content:)`` saying so.
///
/// One deliberate difference from the reference: a dimension larger than `Int.max` (possible only
/// in a zero-element tensor, e.g. `[0, 2^63]`) is reported as ``SafetensorsError/shapeOverflow(path:tensor:shape:dtype:)``
/// because ``TensorInfo/shape`` is `[Int]`. Also, dtypes this package does not know (`U16`, `U32`,
/// `U64`, `C64`, `F8_E8M0`, F4/F6 packed types) are rejected as unknown.
public struct SafetensorsHeader: Sendable, Equatable {
    /// The largest accepted header length N, in bytes (the reference's `MAX_HEADER_SIZE`).
    public static let maximumHeaderLength = 100_000_000
    /// The reserved key of the string-to-string metadata map.
    public static let metadataKey = "__metadata__"

    /// N, the length of the JSON header in bytes (including any padding).
    public let headerLength: Int
    /// The `__metadata__` map (empty when absent or null).
    public let metadata: [String: String]
    /// The tensors, sorted by their offsets (file order).
    public let tensors: [TensorInfo]

    /// The file offset where the data buffer begins: 8 + N.
    public var dataStart: Int { 8 + headerLength }

    /// The total file size the header describes: 8 + N + the end of the last tensor.
    public var fileSize: Int { dataStart + (tensors.last?.byteRange.upperBound ?? 0) }

    public init(headerLength: Int, metadata: [String: String], tensors: [TensorInfo]) {
        self.headerLength = headerLength
        self.metadata = metadata
        self.tensors = tensors
    }

    /// Validates a whole safetensors file held in memory (all of it: rule 7 compares against
    /// `file.count`), applying every rule above. Never traps on malformed input.
    ///
    /// - Parameters:
    ///   - file: the complete file contents.
    ///   - path: the name used in error messages.
    /// - Throws: ``SafetensorsError`` naming `path`, the rule, and the tensor or key when there is one.
    public static func validate(file: UnsafeRawBufferPointer, path: String = "<memory>") throws -> SafetensorsHeader {
        let fileSize = file.count
        // Rule 1.
        guard fileSize >= 8 else { throw SafetensorsError.headerTooSmall(path: path, fileSize: fileSize) }
        // Rule 2.
        let n = UInt64(littleEndian: file.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard n <= UInt64(maximumHeaderLength) else {
            if let content = ForeignFileKind.describe(file) { throw SafetensorsError.notSafetensors(path: path, content: content) }
            throw SafetensorsError.headerTooLarge(path: path, headerLength: n)
        }
        // Rule 3 (n ≤ 1e8, so the conversion and the sum cannot overflow; checked anyway).
        let headerLength = Int(n)
        let (stop, overflow) = headerLength.addingReportingOverflow(8)
        guard !overflow, stop <= fileSize else {
            if let content = ForeignFileKind.describe(file) { throw SafetensorsError.notSafetensors(path: path, content: content) }
            throw SafetensorsError.invalidHeaderLength(path: path, headerLength: n, fileSize: fileSize)
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: file[8..<stop])

        // Rule 4.
        if let badOffset = firstInvalidUTF8Offset(headerBytes) {
            throw SafetensorsError.invalidHeaderUTF8(path: path, byteOffset: badOffset)
        }
        let json: HeaderJSON
        do {
            json = try HeaderJSONParser.parse(headerBytes)
        } catch {
            var reason = error.message
            if error.keyPath.count > 1 {
                reason += " (inside " + error.keyPath.map { "\"\($0)\"" }.joined(separator: " → ") + ")"
            }
            reason += " at header byte \(error.offset)"
            throw SafetensorsError.invalidHeaderDeserialization(path: path, key: error.keyPath.first, reason: reason)
        }
        guard case .object(let members) = json else {
            throw SafetensorsError.invalidHeaderDeserialization(
                path: path, key: nil, reason: "the header is \(json.typeDescription), not a JSON object")
        }

        var metadata: [String: String] = [:]
        var entries: [RawEntry] = []
        entries.reserveCapacity(members.count)
        for (index, member) in members.enumerated() {
            if member.key == metadataKey {
                metadata = try parseMetadata(member.value, path: path)
            } else {
                entries.append(try parseEntry(name: member.key, value: member.value, index: index, path: path))
            }
        }

        // Rules 5 and 6, in offset order.
        entries.sort { ($0.begin, $0.end, $0.index) < ($1.begin, $1.end, $1.index) }
        var expectedBegin: UInt64 = 0
        for entry in entries {
            guard entry.begin == expectedBegin, entry.end >= entry.begin else {
                throw SafetensorsError.invalidOffset(
                    path: path, tensor: entry.name, begin: entry.begin, end: entry.end, expectedBegin: expectedBegin)
            }
            expectedBegin = entry.end
            var elements: UInt64 = 1
            for dimension in entry.shape {
                let (product, overflow) = elements.multipliedReportingOverflow(by: dimension)
                guard !overflow else {
                    throw SafetensorsError.shapeOverflow(path: path, tensor: entry.name, shape: entry.shape, dtype: entry.dtype)
                }
                elements = product
            }
            let (byteCount, overflow) = elements.multipliedReportingOverflow(by: UInt64(entry.dtype.byteSize))
            guard !overflow else {
                throw SafetensorsError.shapeOverflow(path: path, tensor: entry.name, shape: entry.shape, dtype: entry.dtype)
            }
            guard byteCount == entry.end - entry.begin else {
                throw SafetensorsError.tensorSizeMismatch(
                    path: path, tensor: entry.name, shape: entry.shape, dtype: entry.dtype,
                    expectedBytes: byteCount, actualBytes: entry.end - entry.begin)
            }
        }

        // Rule 7.
        let (described, describedOverflow) = UInt64(stop).addingReportingOverflow(expectedBegin)
        guard !describedOverflow else {
            throw SafetensorsError.bufferEndOverflow(path: path, tensor: entries.last?.name ?? "", end: expectedBegin)
        }
        guard described == UInt64(fileSize) else {
            throw SafetensorsError.incompleteBuffer(path: path, expectedFileSize: described, fileSize: fileSize)
        }

        // Every offset is now ≤ fileSize, so it fits in Int; a dimension can exceed Int.max only in
        // a zero-element tensor.
        var tensors: [TensorInfo] = []
        tensors.reserveCapacity(entries.count)
        for entry in entries {
            var shape: [Int] = []
            shape.reserveCapacity(entry.shape.count)
            for dimension in entry.shape {
                guard dimension <= UInt64(Int.max) else {
                    throw SafetensorsError.shapeOverflow(path: path, tensor: entry.name, shape: entry.shape, dtype: entry.dtype)
                }
                shape.append(Int(dimension))
            }
            tensors.append(TensorInfo(name: entry.name, dtype: entry.dtype, shape: shape,
                                      byteRange: Int(entry.begin)..<Int(entry.end)))
        }
        return SafetensorsHeader(headerLength: headerLength, metadata: metadata, tensors: tensors)
    }

    // MARK: - Schema

    /// A tensor entry before offset validation, with the header's raw 64-bit numbers.
    private struct RawEntry {
        var name: String
        var dtype: DType
        var shape: [UInt64]
        var begin: UInt64
        var end: UInt64
        var index: Int
    }

    private static func parseMetadata(_ value: HeaderJSON, path: String) throws -> [String: String] {
        switch value {
        case .null:
            return [:]
        case .object(let members):
            var metadata: [String: String] = [:]
            metadata.reserveCapacity(members.count)
            for member in members {
                guard case .string(let text) = member.value else {
                    throw SafetensorsError.invalidHeaderDeserialization(
                        path: path, key: metadataKey,
                        reason: "the value of metadata key \"\(member.key)\" is \(member.value.typeDescription), not a string (metadata must map strings to strings)")
                }
                metadata[member.key] = text
            }
            return metadata
        default:
            throw SafetensorsError.invalidHeaderDeserialization(
                path: path, key: metadataKey,
                reason: "metadata is \(value.typeDescription), not an object mapping strings to strings")
        }
    }

    private static func parseEntry(name: String, value: HeaderJSON, index: Int, path: String) throws -> RawEntry {
        func fail(_ reason: String) -> SafetensorsError {
            SafetensorsError.invalidHeaderDeserialization(path: path, key: name, reason: reason)
        }
        guard case .object(let fields) = value else {
            throw fail("the entry is \(value.typeDescription), not an object with dtype, shape and data_offsets")
        }
        var dtypeValue: HeaderJSON?
        var shapeValue: HeaderJSON?
        var offsetsValue: HeaderJSON?
        for field in fields {
            switch field.key {
            case "dtype": dtypeValue = field.value
            case "shape": shapeValue = field.value
            case "data_offsets": offsetsValue = field.value
            default: break  // unknown fields are ignored, as the reference does
            }
        }

        guard let dtypeValue else { throw fail("missing field \"dtype\"") }
        guard case .string(let dtypeName) = dtypeValue else {
            throw fail("dtype is \(dtypeValue.typeDescription), not a string")
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw fail("unknown dtype \"\(dtypeName)\" (known: \(DType.allCases.map(\.rawValue).joined(separator: ", ")))")
        }

        guard let shapeValue else { throw fail("missing field \"shape\"") }
        guard case .array(let dimensions) = shapeValue else {
            throw fail("shape is \(shapeValue.typeDescription), not an array of non-negative integers")
        }
        var shape: [UInt64] = []
        shape.reserveCapacity(dimensions.count)
        for (axis, dimension) in dimensions.enumerated() {
            guard case .unsignedInteger(let size) = dimension else {
                throw fail("shape element \(axis) is \(dimension.typeDescription), not a non-negative integer")
            }
            shape.append(size)
        }

        guard let offsetsValue else { throw fail("missing field \"data_offsets\"") }
        guard case .array(let offsets) = offsetsValue else {
            throw fail("data_offsets is \(offsetsValue.typeDescription), not an array of two non-negative integers")
        }
        guard offsets.count == 2 else {
            throw fail("data_offsets has \(offsets.count) elements, not two non-negative integers [begin, end]")
        }
        var bounds: [UInt64] = []
        for (position, offset) in offsets.enumerated() {
            guard case .unsignedInteger(let bound) = offset else {
                throw fail("data_offsets[\(position)] is \(offset.typeDescription), not a non-negative integer")
            }
            bounds.append(bound)
        }
        return RawEntry(name: name, dtype: dtype, shape: shape, begin: bounds[0], end: bounds[1], index: index)
    }
}

// MARK: - UTF-8

/// The offset of the first byte that makes `bytes` invalid UTF-8, or nil if it is valid.
/// The rules of Unicode/RFC 3629: no overlong forms, no surrogates (U+D800–U+DFFF), nothing above
/// U+10FFFF, no truncated sequences.
func firstInvalidUTF8Offset(_ bytes: UnsafeRawBufferPointer) -> Int? {
    let count = bytes.count
    var i = 0
    while i < count {
        let lead = bytes[i]
        if lead < 0x80 {
            i += 1
            continue
        }
        let length: Int
        var low: UInt8 = 0x80
        var high: UInt8 = 0xBF
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; high = 0x9F
        case 0xF0: length = 4; low = 0x90
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; high = 0x8F
        default: return i
        }
        guard count - i >= length else { return i }
        let second = bytes[i + 1]
        guard second >= low && second <= high else { return i }
        for k in 2..<max(length, 2) where bytes[i + k] & 0xC0 != 0x80 {
            return i
        }
        i += length
    }
    return nil
}
