/// JSON-RPC 2.0 message processing, independent of transport: one message body in, one
/// response body (or none) out.
///
/// - A request has `"jsonrpc": "2.0"`, a string `method`, optional `params` (array or
///   object) and an `id` (string, number or null); its response echoes the `id` exactly.
/// - A notification has no `id` and is never answered, even when it fails.
/// - A batch is a non-empty array of those; its response is the array of the responses
///   (none when all were notifications). An empty batch is one -32600 error.
/// - Unparsable text is one -32700 error with a null id.
public enum JSONRPCDispatcher {
    /// Handles one call; throws ``RPCError`` for protocol-level failures.
    public typealias Handler = (_ method: String, _ params: JSONValue?) throws -> JSONValue

    /// Processes one message body; returns the response body, or nil when nothing is owed.
    public static func process(_ body: [UInt8], handler: Handler) -> [UInt8]? {
        let message: JSONValue
        do {
            message = try JanssonCodec.decode(body)
        } catch let error as JanssonCodec.ParseError {
            let response = errorResponse(id: .null, RPCError.parseError(
                error.message, data: ["line": .integer(Int64(error.line)), "column": .integer(Int64(error.column)),
                                      "position": .integer(Int64(error.position))]))
            return JanssonCodec.encode(response)
        } catch {
            return JanssonCodec.encode(errorResponse(id: .null, .parseError("\(error)")))
        }
        return process(message, handler: handler).map(JanssonCodec.encode)
    }

    /// Processes one parsed message (single or batch).
    public static func process(_ message: JSONValue, handler: Handler) -> JSONValue? {
        guard case let .array(batch) = message else { return processSingle(message, handler: handler) }
        if batch.isEmpty { return errorResponse(id: .null, .invalidRequest("an empty batch")) }
        let responses = batch.compactMap { processSingle($0, handler: handler) }
        return responses.isEmpty ? nil : .array(responses)
    }

    private static func processSingle(_ message: JSONValue, handler: Handler) -> JSONValue? {
        guard case let .object(object) = message else {
            return errorResponse(id: .null, .invalidRequest("a request must be an object, got \(message.typeName)"))
        }
        let rawID = object["id"]
        // An id of the wrong type cannot be echoed: answer with null.
        let id: JSONValue
        switch rawID {
        case .none, .some(.null): id = .null
        case let .some(value):
            switch value {
            case .string, .integer, .double: id = value
            default: return errorResponse(id: .null, .invalidRequest("id must be a string, a number or null, got \(value.typeName)"))
            }
        }
        guard object["jsonrpc"] == .string("2.0") else {
            return errorResponse(id: id, .invalidRequest("\"jsonrpc\" must be exactly \"2.0\""))
        }
        guard case let .string(method)? = object["method"] else {
            return errorResponse(id: id, .invalidRequest("\"method\" must be a string"))
        }
        let params = object["params"]
        if let params {
            switch params {
            case .array, .object: break
            default: return errorResponse(id: id, .invalidRequest("\"params\" must be an array or an object, got \(params.typeName)"))
            }
        }
        // (Explicit returns: `cond ? nil : value` would type nil as JSONValue.null.)
        let isNotification = rawID == nil
        let response: JSONValue
        do {
            response = ["jsonrpc": "2.0", "id": id, "result": try handler(method, params)]
        } catch let error as RPCError {
            response = errorResponse(id: id, error)
        } catch {
            response = errorResponse(id: id, .internalError("\(error)"))
        }
        if isNotification { return nil }
        return response
    }

    public static func errorResponse(id: JSONValue, _ error: RPCError) -> JSONValue {
        ["jsonrpc": "2.0", "id": id, "error": error.json]
    }
}
