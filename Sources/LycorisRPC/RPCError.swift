/// A JSON-RPC 2.0 error object: code, message naming the problem, and details in `data`.
public struct RPCError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public var data: JSONValue?

    public init(code: Int, message: String, data: JSONValue? = nil) {
        self.code = code
        self.message = message
        self.data = data
    }

    public var description: String { "error \(code): \(message)" }

    public var json: JSONValue {
        var object: JSONObject = ["code": .integer(Int64(code)), "message": .string(message)]
        if let data { object["data"] = data }
        return .object(object)
    }

    // MARK: JSON-RPC 2.0 codes

    public static let parseErrorCode = -32700
    public static let invalidRequestCode = -32600
    public static let methodNotFoundCode = -32601
    public static let invalidParamsCode = -32602
    public static let internalErrorCode = -32603

    public static func parseError(_ message: String, data: JSONValue? = nil) -> RPCError {
        RPCError(code: parseErrorCode, message: "Parse error: \(message)", data: data)
    }
    public static func invalidRequest(_ message: String) -> RPCError {
        RPCError(code: invalidRequestCode, message: "Invalid Request: \(message)")
    }
    public static func methodNotFound(_ method: String) -> RPCError {
        RPCError(code: methodNotFoundCode, message: "Method not found: \(method)", data: ["method": .string(method)])
    }
    /// A parameter problem; `path` names the parameter (e.g. `modules[2].input.shape`).
    public static func invalidParams(_ message: String, path: String? = nil) -> RPCError {
        RPCError(code: invalidParamsCode, message: "Invalid params: \(message)", data: path.map { ["path": .string($0)] })
    }
    public static func internalError(_ message: String) -> RPCError {
        RPCError(code: internalErrorCode, message: "Internal error: \(message)")
    }
}
