/// The binary call record (protocol/README.md, "Binary call record"): the hot per-layer
/// calls (`forward`, `backward`) as fixed-layout little-endian records on the same stream as
/// the JSON-RPC texts, decoded without building a JSON tree. A record starts with the byte
/// 0xFF, which never starts a UTF-8 text, so the reader tells it from JSON by its first byte.
///
/// Every record begins with the 16-byte header
///
///     offset 0  u8   magic 0xFF
///     offset 1  u8   version (1)
///     offset 2  u16  method code (request) or status (response: 0 ok, 1 error)
///     offset 4  u32  length of the whole record in bytes, header included
///     offset 8  u64  id, echoed by the response
///
/// followed by the method's body (``layouts`` lists every part, field by field, as the spec
/// does; a test checks the two against each other).
public enum CallRecord {
    public static let magic: UInt8 = 0xFF
    public static let version: UInt8 = 1
    public static let headerSize = 16
    /// Where the header's u32 length lies.
    public static let lengthOffset = 4
    /// The most extents a tensor descriptor may carry.
    public static let maximumRank = 8

    /// Request method codes.
    public enum Method: UInt16, CaseIterable, Sendable {
        case forward = 1
        case backward = 2
        /// Never answered, like a JSON-RPC notification.
        case tapesRelease = 3

        public var name: String {
            switch self {
            case .forward: "forward"
            case .backward: "backward"
            case .tapesRelease: "tapes.release"
            }
        }
    }

    /// Response status codes.
    public enum Status: UInt16, Sendable {
        case ok = 0
        case error = 1
    }

    /// Tensor dtypes by wire code (the code is the position).
    public static let dtypeNames = ["F32", "F16", "BF16"]

    /// `forward` flags.
    public static let forwardGrad: UInt32 = 1, forwardElementwise: UInt32 = 2, forwardFull: UInt32 = 4
    /// `backward` flags.
    public static let backwardKeep: UInt32 = 1, backwardAccumulate: UInt32 = 2, backwardParameterGrads: UInt32 = 4

    /// One field of a record part: its name and wire type (`u8`, `u16`, `u32`, `u64`, `i32`,
    /// `pad3`: three zero bytes).
    public struct Field: Equatable, Sendable {
        public let name: String
        public let type: String
        public init(_ name: String, _ type: String) { self.name = name; self.type = type }
    }

    /// Every fixed part of a record, in wire order. A tensor descriptor is `tensor` followed by
    /// `rank` u64 extents; `tapes.release` by `count` u64 tapes; the error body by its JSON text.
    public static let layouts: [(part: String, fields: [Field])] = [
        ("header", [Field("magic", "u8"), Field("version", "u8"), Field("code", "u16"), Field("length", "u32"), Field("id", "u64")]),
        ("tensor", [Field("offset", "u64"), Field("dtype", "u8"), Field("rank", "u8"), Field("reserved", "u16")]),
        ("output", [Field("offset", "u64"), Field("dtype", "u8"), Field("reserved", "pad3")]),
        ("forward", [Field("module", "u32"), Field("flags", "u32")]),
        ("forward result", [Field("tape", "u64")]),
        ("backward", [Field("tape", "u64"), Field("flags", "u32"), Field("parameter_grads", "u32")]),
        ("tapes.release", [Field("count", "u32")]),
        ("error", [Field("code", "i32"), Field("json_length", "u32")]),
    ]
}

/// Reads a record's fields in order; running past the end throws an error naming the field.
public struct CallRecordReader {
    public let bytes: [UInt8]
    public private(set) var position: Int

    public init(_ bytes: [UInt8], position: Int = 0) {
        self.bytes = bytes
        self.position = position
    }

    private mutating func take(_ count: Int, _ field: @autoclosure () -> String) throws -> Int {
        guard bytes.count - position >= count else {
            throw RPCError.invalidParams("call record truncated: \(field()) needs \(count) bytes at byte \(position), the record has \(bytes.count)",
                                         path: field())
        }
        defer { position += count }
        return position
    }

    public mutating func u8(_ field: @autoclosure () -> String) throws -> UInt8 {
        bytes[try take(1, field())]
    }

    public mutating func u16(_ field: @autoclosure () -> String) throws -> UInt16 {
        let at = try take(2, field())
        return UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8
    }

    public mutating func u32(_ field: @autoclosure () -> String) throws -> UInt32 {
        let at = try take(4, field())
        var value: UInt32 = 0
        for i in (0..<4).reversed() { value = value << 8 | UInt32(bytes[at + i]) }
        return value
    }

    public mutating func u64(_ field: @autoclosure () -> String) throws -> UInt64 {
        let at = try take(8, field())
        var value: UInt64 = 0
        for i in (0..<8).reversed() { value = value << 8 | UInt64(bytes[at + i]) }
        return value
    }

    /// A u64 that must fit a non-negative Int (offsets, extents, tapes).
    public mutating func count(_ field: @autoclosure () -> String) throws -> Int {
        let value = try u64(field())
        guard value <= UInt64(Int.max) else {
            throw RPCError.invalidParams("\(field()) is \(value), past the largest offset or extent (\(Int.max))", path: field())
        }
        return Int(value)
    }

    public mutating func skip(_ count: Int, _ field: @autoclosure () -> String) throws {
        _ = try take(count, field())
    }

    /// Throws when bytes are left after the last field.
    public func expectEnd() throws {
        guard position == bytes.count else {
            throw RPCError.invalidParams("call record has \(bytes.count - position) bytes after its last field (byte \(position) of \(bytes.count))",
                                         path: "length")
        }
    }
}

/// Builds a record: the header first, the length filled in by ``finish()``.
public struct CallRecordWriter {
    public private(set) var bytes: [UInt8] = []

    /// Starts a record with `code` (a method or status) and `id`.
    public init(code: UInt16, id: UInt64, capacity: Int = 32) {
        bytes.reserveCapacity(capacity)
        u8(CallRecord.magic)
        u8(CallRecord.version)
        u16(code)
        u32(0)
        u64(id)
    }

    public mutating func u8(_ value: UInt8) { bytes.append(value) }
    public mutating func u16(_ value: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * i))) } }
    public mutating func u32(_ value: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * i))) } }
    public mutating func u64(_ value: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * i))) } }
    public mutating func i32(_ value: Int32) { u32(UInt32(bitPattern: value)) }
    public mutating func append(_ data: [UInt8]) { bytes.append(contentsOf: data) }

    /// The record with its length field set.
    public func finish() -> [UInt8] {
        var result = bytes
        let length = UInt32(result.count)
        for i in 0..<4 { result[4 + i] = UInt8(truncatingIfNeeded: length >> (8 * i)) }
        return result
    }

    /// An error response: status 1, the JSON-RPC error code, and the error object as JSON.
    public static func error(id: UInt64, _ error: RPCError) -> [UInt8] {
        let json = JanssonCodec.encode(error.json)
        var writer = CallRecordWriter(code: CallRecord.Status.error.rawValue, id: id, capacity: 24 + json.count)
        writer.i32(Int32(clamping: error.code))
        writer.u32(UInt32(json.count))
        writer.append(json)
        return writer.finish()
    }
}
