import LycorisRPC

/// Typed access to a method's named parameters, with errors (−32602) that name the
/// parameter by its path (`layers[3].kernel_size`).
struct Params {
    let object: JSONObject
    let path: String

    init(_ value: JSONValue?, path: String = "params") throws {
        switch value {
        case .none: object = JSONObject()
        case let .object(object)?: self.object = object
        case .array? where path == "params":
            throw RPCError.invalidParams("this method takes named parameters (an object), not an array", path: path)
        case let other?: throw RPCError.invalidParams("\(path) must be an object, got \(other.typeName)", path: path)
        }
        self.path = path
    }

    func at(_ key: String) -> String { path == "params" ? key : "\(path).\(key)" }

    func has(_ key: String) -> Bool { object[key] != nil && object[key] != .null }

    func value(_ key: String) throws -> JSONValue {
        guard let value = object[key], value != .null else { throw RPCError.invalidParams("missing \(at(key))", path: at(key)) }
        return value
    }

    func string(_ key: String) throws -> String {
        guard case let .string(s) = try value(key) else { throw wrongType(key, "a string") }
        return s
    }
    func string(_ key: String, default fallback: String) throws -> String { has(key) ? try string(key) : fallback }

    func int(_ key: String) throws -> Int {
        guard let i = try value(key).intValue else { throw wrongType(key, "an integer") }
        return i
    }
    func int(_ key: String, default fallback: Int) throws -> Int { has(key) ? try int(key) : fallback }

    func float(_ key: String) throws -> Float {
        guard let d = try value(key).doubleValue else { throw wrongType(key, "a number") }
        guard Float(d).isFinite else { throw RPCError.invalidParams("\(at(key)) must be finite (as a 32-bit float), got \(d)", path: at(key)) }
        return Float(d)
    }
    func float(_ key: String, default fallback: Float) throws -> Float { has(key) ? try float(key) : fallback }

    func bool(_ key: String) throws -> Bool {
        guard case let .bool(b) = try value(key) else { throw wrongType(key, "a boolean") }
        return b
    }
    func bool(_ key: String, default fallback: Bool) throws -> Bool { has(key) ? try bool(key) : fallback }

    func ints(_ key: String) throws -> [Int] {
        guard case let .array(items) = try value(key) else { throw wrongType(key, "an array of integers") }
        return try items.enumerated().map { index, item in
            guard let i = item.intValue else { throw RPCError.invalidParams("\(at(key))[\(index)] must be an integer", path: "\(at(key))[\(index)]") }
            return i
        }
    }

    func strings(_ key: String) throws -> [String] {
        guard case let .array(items) = try value(key) else { throw wrongType(key, "an array of strings") }
        return try items.enumerated().map { index, item in
            guard case let .string(s) = item else { throw RPCError.invalidParams("\(at(key))[\(index)] must be a string", path: "\(at(key))[\(index)]") }
            return s
        }
    }

    func object(_ key: String) throws -> Params { try Params(value(key), path: at(key)) }

    func array(_ key: String) throws -> [JSONValue] {
        guard case let .array(items) = try value(key) else { throw wrongType(key, "an array") }
        return items
    }

    /// Each element of an array of objects, as Params with its indexed path.
    func objects(_ key: String) throws -> [Params] {
        try array(key).enumerated().map { try Params($1, path: "\(at(key))[\($0)]") }
    }

    private func wrongType(_ key: String, _ expected: String) -> RPCError {
        RPCError.invalidParams("\(at(key)) must be \(expected), got \(object[key]?.typeName ?? "nothing")", path: at(key))
    }
}
