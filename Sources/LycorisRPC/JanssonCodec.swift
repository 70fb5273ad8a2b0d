import CJansson
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The JSON codec: jansson (the project's design choice), confined to this file behind
/// ``JSONValue``. Every `json_t` made here is released here.
public enum JanssonCodec {
    /// A JSON text that could not be parsed, with jansson's position and reason.
    public struct ParseError: Error, Sendable, Equatable {
        public let message: String
        public let line: Int
        public let column: Int
        public let position: Int
    }

    /// Parses one JSON text (any value at top level; duplicate keys rejected).
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> JSONValue {
        var error = json_error_t()
        let flags = JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL
        guard let base = bytes.baseAddress?.assumingMemoryBound(to: CChar.self),
              let root = json_loadb(base, bytes.count, Int(flags), &error) else {
            let text = withUnsafeBytes(of: error.text) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            throw ParseError(message: bytes.isEmpty ? "empty message" : text, line: Int(error.line),
                             column: Int(error.column), position: Int(error.position))
        }
        defer { json_decref(root) }
        return convert(root)
    }

    public static func decode(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBytes { try decode($0) }
    }

    private static func convert(_ node: UnsafeMutablePointer<json_t>) -> JSONValue {
        switch node.pointee.type {
        case JSON_OBJECT:
            var object = JSONObject()
            var iterator = json_object_iter(node)
            while let current = iterator {
                let key = String(cString: json_object_iter_key(current))
                if let value = json_object_iter_value(current) { object[key] = convert(value) }
                iterator = json_object_iter_next(node, current)
            }
            return .object(object)
        case JSON_ARRAY:
            return .array((0..<json_array_size(node)).map { convert(json_array_get(node, $0)) })
        case JSON_STRING:
            let length = json_string_length(node)
            let pointer = UnsafeRawPointer(json_string_value(node)!)
            return .string(String(decoding: UnsafeRawBufferPointer(start: pointer, count: length), as: UTF8.self))
        case JSON_INTEGER: return .integer(Int64(json_integer_value(node)))
        case JSON_REAL: return .double(json_real_value(node))
        case JSON_TRUE: return .bool(true)
        case JSON_FALSE: return .bool(false)
        default: return .null
        }
    }

    /// Serialises compactly (no newlines, so a message is one NDJSON line), keys in order.
    /// Non-finite reals, which JSON cannot hold, become null.
    public static func encode(_ value: JSONValue) -> [UInt8] {
        let node = make(value)
        defer { json_decref(node) }
        // JSON_REAL_PRECISION(17) is a function-like macro: ((17 & 0x1F) << 11).
        let flags = Int32(JSON_COMPACT) | Int32(JSON_PRESERVE_ORDER) | Int32(JSON_ENCODE_ANY) | (17 << 11)
        guard let text = json_dumps(node, Int(flags)) else { return Array("null".utf8) }
        defer { free(text) }
        return Array(UnsafeRawBufferPointer(start: text, count: strlen(text)))
    }

    private static func make(_ value: JSONValue) -> UnsafeMutablePointer<json_t> {
        switch value {
        case .null: return json_null()
        case let .bool(b): return b ? json_true() : json_false()
        case let .integer(i): return json_integer(json_int_t(i))
        case let .double(d): return d.isFinite ? json_real(d) : json_null()
        case let .string(s):
            var s = s
            return s.withUTF8 { json_stringn_nocheck(UnsafeRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), $0.count) }
        case let .array(elements):
            let array = json_array()!
            for element in elements { json_array_append_new(array, make(element)) }
            return array
        case let .object(object):
            let node = json_object()!
            for (key, member) in object.members { json_object_set_new_nocheck(node, key, make(member)) }
            return node
        }
    }
}
