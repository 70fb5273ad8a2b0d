import LycorisRPC

/// The server's domain error codes (JSON-RPC's server range −32000…−32099); each error's
/// message names the problem and `data` carries details. Documented in protocol/.
extension RPCError {
    /// A method other than `initialize`, `rpc.discover` or `shutdown` before `initialize`.
    public static let notInitializedCode = -32000
    /// A module name, parameter key or tape id that does not exist.
    public static let unknownModuleCode = -32001
    /// A tensor whose shape does not fit the layer, parameter or output.
    public static let shapeMismatchCode = -32002
    /// An unsupported or mismatched dtype.
    public static let dtypeMismatchCode = -32003
    /// NaN or ±∞ in an input, gradient or parameter.
    public static let nonFiniteCode = -32004
    /// A file could not be read or written.
    public static let ioErrorCode = -32005
    /// No arena, a descriptor outside it, or an arena that cannot be created or grown.
    public static let arenaErrorCode = -32006
    /// The call does not fit the server's state (no network yet, network exists already…).
    public static let stateErrorCode = -32007
    /// An adapter description the algorithms reject (unknown algorithm, bad options…).
    public static let adapterErrorCode = -32008

    static func notInitialized(_ method: String) -> RPCError {
        RPCError(code: notInitializedCode, message: "Not initialized: call initialize before \(method)", data: ["method": .string(method)])
    }
    static func unknownModule(_ name: String, kind: String = "module") -> RPCError {
        RPCError(code: unknownModuleCode, message: "Unknown \(kind): \(name)", data: [kind: .string(name)])
    }
    static func shapeMismatch(_ message: String, path: String) -> RPCError {
        RPCError(code: shapeMismatchCode, message: "Shape mismatch: \(message)", data: ["path": .string(path)])
    }
    static func dtypeMismatch(_ message: String, path: String) -> RPCError {
        RPCError(code: dtypeMismatchCode, message: "Dtype error: \(message)", data: ["path": .string(path)])
    }
    /// NaN or ±∞ in `path`; where the tensor belongs to a module's call, `module` and `pass`
    /// (`forward`, `backward`, `parameters`) name it, in the message and in `data`.
    static func nonFinite(_ path: String, count: Int, module: String? = nil, pass: String? = nil) -> RPCError {
        var data: JSONObject = ["path": .string(path), "count": .integer(Int64(count))]
        var place = path
        if let module, let pass {
            data["module"] = .string(module)
            data["pass"] = .string(pass)
            place = "\(path) (module \(module), \(pass))"
        }
        return RPCError(code: nonFiniteCode, message: "Non-finite values: \(place) has \(count) NaN or infinite elements", data: .object(data))
    }

    /// Runs `body`; a non-finite error it throws gets `module` and `pass` added.
    static func naming<T>(module: String, pass: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as RPCError where error.code == nonFiniteCode {
            guard case let .object(data)? = error.data, let path = data["path"]?.stringValue,
                  let count = data["count"]?.intValue else { throw error }
            throw nonFinite(path, count: count, module: module, pass: pass)
        }
    }
    /// `rule`: the safetensors rule a file breaks (``SafetensorsError/rule``), when that is the problem.
    static func io(_ message: String, path: String, rule: String? = nil) -> RPCError {
        var data: JSONObject = ["file": .string(path)]
        if let rule { data["rule"] = .string(rule) }
        return RPCError(code: ioErrorCode, message: "I/O error: \(message)", data: .object(data))
    }
    static func arena(_ message: String, path: String? = nil) -> RPCError {
        RPCError(code: arenaErrorCode, message: "Arena error: \(message)", data: path.map { ["path": .string($0)] })
    }
    static func state(_ message: String) -> RPCError {
        RPCError(code: stateErrorCode, message: "State error: \(message)")
    }
    static func adapter(_ message: String, path: String? = nil) -> RPCError {
        RPCError(code: adapterErrorCode, message: "Adapter error: \(message)", data: path.map { ["path": .string($0)] })
    }
}
