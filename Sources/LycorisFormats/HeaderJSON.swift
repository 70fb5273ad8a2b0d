/// A JSON value as read from a safetensors header.
///
/// Objects keep their members in file order (duplicate keys are rejected while parsing, at every
/// level). Numbers keep their literal text unless they are plain non-negative integers that fit in
/// `UInt64`, so no precision is lost and floats/negatives can be told apart from offsets and sizes.
enum HeaderJSON {
    case object([HeaderJSONMember])
    case array([HeaderJSON])
    case string(String)
    /// A non-negative integer literal (`0` or `[1-9][0-9]*`) that fits in `UInt64`.
    case unsignedInteger(UInt64)
    /// Any other number (negative, fraction, exponent, or too large for `UInt64`), as written.
    case otherNumber(String)
    case bool(Bool)
    case null

    /// A short name of the value's JSON type, for error messages.
    var typeDescription: String {
        switch self {
        case .object: return "an object"
        case .array: return "an array"
        case .string: return "a string"
        case .unsignedInteger: return "a non-negative integer"
        case .otherNumber(let text):
            if text.hasPrefix("-") { return "a negative number (\(text))" }
            if text.contains(where: { $0 == "." || $0 == "e" || $0 == "E" }) { return "a non-integer number (\(text))" }
            return "an integer too large for 64 bits (\(text))"
        case .bool(let value): return value ? "true" : "false"
        case .null: return "null"
        }
    }
}

/// One `"key": value` member of a JSON object.
struct HeaderJSONMember {
    var key: String
    var value: HeaderJSON
}

/// A JSON syntax error: what went wrong, the byte offset in the header, and the chain of object
/// keys leading to it (outermost first; empty at the top level).
struct HeaderJSONError: Error, Equatable {
    var message: String
    var offset: Int
    var keyPath: [String]
}

/// A strict RFC 8259 recursive-descent parser over UTF-8 bytes (which the caller has already
/// validated as UTF-8).
///
/// Rules: exactly one value surrounded by optional whitespace (space, tab, LF, CR); no trailing
/// characters; no comments, trailing commas, single quotes, or leading zeros; strings may not
/// contain raw control characters (< 0x20); `\u` escapes must pair surrogates correctly;
/// duplicate keys in any object are an error; arrays and objects may nest at most
/// ``maximumDepth`` levels deep (so a hostile header cannot exhaust the stack).
struct HeaderJSONParser {
    /// The nesting limit (the same as serde_json's default recursion limit). A valid safetensors
    /// header needs 3.
    static let maximumDepth = 128

    private let bytes: UnsafeRawBufferPointer
    private var position = 0
    private var depth = 0
    private var keyPath: [String] = []

    private init(bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    /// Parses `bytes` as one JSON document.
    static func parse(_ bytes: UnsafeRawBufferPointer) throws(HeaderJSONError) -> HeaderJSON {
        var parser = HeaderJSONParser(bytes: bytes)
        parser.skipWhitespace()
        let value = try parser.parseValue()
        parser.skipWhitespace()
        if parser.position < bytes.count {
            throw parser.error("trailing characters after the JSON value")
        }
        return value
    }

    // MARK: - Helpers

    private func error(_ message: String) -> HeaderJSONError {
        HeaderJSONError(message: message, offset: position, keyPath: keyPath)
    }

    private var atEnd: Bool { position >= bytes.count }

    private func peek() -> UInt8? {
        position < bytes.count ? bytes[position] : nil
    }

    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func expect(_ literal: StaticString, value: HeaderJSON) throws(HeaderJSONError) -> HeaderJSON {
        let count = literal.utf8CodeUnitCount
        let start = literal.utf8Start
        guard bytes.count - position >= count else { throw error("unexpected end of JSON input") }
        for i in 0..<count where bytes[position + i] != start[i] {
            throw error("invalid literal")
        }
        position += count
        return value
    }

    private static func describe(_ byte: UInt8) -> String {
        if byte >= 0x20 && byte < 0x7F { return "'\(Character(Unicode.Scalar(byte)))'" }
        let hex = String(byte, radix: 16, uppercase: true)
        return "byte 0x" + (hex.count < 2 ? "0" + hex : hex)
    }

    // MARK: - Values

    private mutating func parseValue() throws(HeaderJSONError) -> HeaderJSON {
        guard let byte = peek() else { throw error("unexpected end of JSON input") }
        switch byte {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try expect("true", value: .bool(true))
        case UInt8(ascii: "f"): return try expect("false", value: .bool(false))
        case UInt8(ascii: "n"): return try expect("null", value: .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw error("unexpected \(Self.describe(byte)) where a JSON value was expected")
        }
    }

    private mutating func enterContainer() throws(HeaderJSONError) {
        depth += 1
        if depth > Self.maximumDepth {
            throw error("JSON nesting deeper than \(Self.maximumDepth) levels")
        }
    }

    private mutating func parseObject() throws(HeaderJSONError) -> HeaderJSON {
        try enterContainer()
        position += 1  // '{'
        var members: [HeaderJSONMember] = []
        var seen = Set<String>()
        skipWhitespace()
        if peek() == UInt8(ascii: "}") {
            position += 1
            depth -= 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard let byte = peek() else { throw error("unexpected end of JSON input inside an object") }
            guard byte == UInt8(ascii: "\"") else {
                throw error("unexpected \(Self.describe(byte)) where an object key was expected")
            }
            let keyStart = position
            let key = try parseString()
            if !seen.insert(key).inserted {
                position = keyStart
                throw error("duplicate key \"\(key)\"")
            }
            skipWhitespace()
            guard peek() == UInt8(ascii: ":") else {
                throw atEnd ? error("unexpected end of JSON input inside an object") : error("expected ':' after an object key")
            }
            position += 1
            skipWhitespace()
            keyPath.append(key)
            let value = try parseValue()
            keyPath.removeLast()
            members.append(HeaderJSONMember(key: key, value: value))
            skipWhitespace()
            guard let separator = peek() else { throw error("unexpected end of JSON input inside an object") }
            position += 1
            if separator == UInt8(ascii: ",") { continue }
            if separator == UInt8(ascii: "}") { break }
            position -= 1
            throw error("expected ',' or '}' in an object, found \(Self.describe(separator))")
        }
        depth -= 1
        return .object(members)
    }

    private mutating func parseArray() throws(HeaderJSONError) -> HeaderJSON {
        try enterContainer()
        position += 1  // '['
        var elements: [HeaderJSON] = []
        skipWhitespace()
        if peek() == UInt8(ascii: "]") {
            position += 1
            depth -= 1
            return .array(elements)
        }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            guard let separator = peek() else { throw error("unexpected end of JSON input inside an array") }
            position += 1
            if separator == UInt8(ascii: ",") { continue }
            if separator == UInt8(ascii: "]") { break }
            position -= 1
            throw error("expected ',' or ']' in an array, found \(Self.describe(separator))")
        }
        depth -= 1
        return .array(elements)
    }

    private mutating func parseString() throws(HeaderJSONError) -> String {
        position += 1  // opening quote
        let start = position
        // Fast path: no escapes.
        while position < bytes.count {
            let byte = bytes[position]
            if byte == UInt8(ascii: "\"") {
                let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
                position += 1
                return text
            }
            if byte == UInt8(ascii: "\\") { break }
            if byte < 0x20 { throw error("control character \(Self.describe(byte)) inside a string") }
            position += 1
        }
        guard position < bytes.count else { throw error("unexpected end of JSON input inside a string") }
        // Slow path: copy what we have, then decode escapes.
        var utf8 = [UInt8](UnsafeRawBufferPointer(rebasing: bytes[start..<position]))
        while position < bytes.count {
            let byte = bytes[position]
            switch byte {
            case UInt8(ascii: "\""):
                position += 1
                return String(decoding: utf8, as: UTF8.self)
            case UInt8(ascii: "\\"):
                position += 1
                guard let escape = peek() else { throw error("unexpected end of JSON input inside a string") }
                position += 1
                switch escape {
                case UInt8(ascii: "\""): utf8.append(0x22)
                case UInt8(ascii: "\\"): utf8.append(0x5C)
                case UInt8(ascii: "/"): utf8.append(0x2F)
                case UInt8(ascii: "b"): utf8.append(0x08)
                case UInt8(ascii: "f"): utf8.append(0x0C)
                case UInt8(ascii: "n"): utf8.append(0x0A)
                case UInt8(ascii: "r"): utf8.append(0x0D)
                case UInt8(ascii: "t"): utf8.append(0x09)
                case UInt8(ascii: "u"):
                    let scalar = try parseUnicodeEscape()
                    utf8.append(contentsOf: String(Character(scalar)).utf8)
                default:
                    position -= 1
                    throw error("invalid escape \\\(Character(Unicode.Scalar(escape))) in a string")
                }
            default:
                if byte < 0x20 { throw error("control character \(Self.describe(byte)) inside a string") }
                utf8.append(byte)
                position += 1
            }
        }
        throw error("unexpected end of JSON input inside a string")
    }

    /// Reads the four hex digits after `\u` (and a following `\uDC00`-`\uDFFF` for a high surrogate).
    private mutating func parseUnicodeEscape() throws(HeaderJSONError) -> Unicode.Scalar {
        let first = try parseHex4()
        switch first {
        case 0xD800...0xDBFF:
            guard bytes.count - position >= 6,
                  bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                throw error("lone leading surrogate in a \\u escape")
            }
            position += 2
            let second = try parseHex4()
            guard (0xDC00...0xDFFF).contains(second) else {
                throw error("a leading surrogate not followed by a trailing surrogate in a \\u escape")
            }
            let value = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            guard let scalar = Unicode.Scalar(value) else { throw error("invalid \\u escape") }
            return scalar
        case 0xDC00...0xDFFF:
            throw error("lone trailing surrogate in a \\u escape")
        default:
            guard let scalar = Unicode.Scalar(first) else { throw error("invalid \\u escape") }
            return scalar
        }
    }

    private mutating func parseHex4() throws(HeaderJSONError) -> UInt32 {
        guard bytes.count - position >= 4 else { throw error("unexpected end of JSON input inside a \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[position]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("invalid hex digit \(Self.describe(byte)) in a \\u escape")
            }
            value = value << 4 | UInt32(digit)
            position += 1
        }
        return value
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    private mutating func parseNumber() throws(HeaderJSONError) -> HeaderJSON {
        let start = position
        var isPlainUnsigned = true
        if peek() == UInt8(ascii: "-") {
            isPlainUnsigned = false
            position += 1
        }
        guard let firstDigit = peek(), firstDigit >= UInt8(ascii: "0"), firstDigit <= UInt8(ascii: "9") else {
            throw error("invalid number: expected a digit")
        }
        var value: UInt64 = 0
        var overflow = false
        if firstDigit == UInt8(ascii: "0") {
            position += 1
            if let next = peek(), next >= UInt8(ascii: "0"), next <= UInt8(ascii: "9") {
                throw error("invalid number: leading zero")
            }
        } else {
            while let digit = peek(), digit >= UInt8(ascii: "0"), digit <= UInt8(ascii: "9") {
                if !overflow {
                    let (times10, o1) = value.multipliedReportingOverflow(by: 10)
                    let (sum, o2) = times10.addingReportingOverflow(UInt64(digit - UInt8(ascii: "0")))
                    if o1 || o2 { overflow = true } else { value = sum }
                }
                position += 1
            }
        }
        if peek() == UInt8(ascii: ".") {
            isPlainUnsigned = false
            position += 1
            try consumeDigits(after: "a decimal point")
        }
        if let e = peek(), e == UInt8(ascii: "e") || e == UInt8(ascii: "E") {
            isPlainUnsigned = false
            position += 1
            if let sign = peek(), sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-") { position += 1 }
            try consumeDigits(after: "an exponent")
        }
        if isPlainUnsigned && !overflow { return .unsignedInteger(value) }
        return .otherNumber(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self))
    }

    private mutating func consumeDigits(after what: String) throws(HeaderJSONError) {
        var any = false
        while let digit = peek(), digit >= UInt8(ascii: "0"), digit <= UInt8(ascii: "9") {
            position += 1
            any = true
        }
        if !any { throw error("invalid number: expected a digit after \(what)") }
    }
}
