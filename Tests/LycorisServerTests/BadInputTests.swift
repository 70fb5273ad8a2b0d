import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import LycorisRPC
import LycorisServer
import Testing

/// Every bad input gets the exact error code, a message naming the problem and `data`
/// where the server provides it — and the server answers the next valid request correctly.
@Suite("bad inputs")
struct BadInputTests {
    /// An initialized server with the standard network (random LoRA parameters).
    func standardServer(config: AdapterConfig = .lora) throws -> (ServerHarness, OracleNetwork) {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, config: config)
        return (harness, oracle)
    }

    /// The one response to a raw message body.
    func rawResponse(_ harness: ServerHarness, _ text: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> WireResponse {
        let bytes = try #require(harness.process(text), "no response to \(text)", sourceLocation: sourceLocation)
        return try WireResponse(try JanssonCodec.decode(bytes), sourceLocation: sourceLocation)
    }

    static let linInput = randomTensor([2, 3, 16], seed: 31)

    // MARK: - JSON and JSON-RPC

    @Test("truncated JSON: -32700 with a null id and the position of the end of input")
    func truncatedJSON() throws {
        let (harness, oracle) = try standardServer()
        let text = #"{"jsonrpc":"2.0","id":1,"method":"network.info""#
        let response = try rawResponse(harness, text)
        #expect(response.id == .null)
        let error = try #require(response.error)
        expectError(error, code: -32700, "Parse error", "expected near end of file")
        #expect(error.data?["position"]?.intValue == text.utf8.count)
        #expect(error.data?["line"]?.intValue == 1)
        #expect(error.data?["column"]?.intValue == text.utf8.count)
        try harness.expectServes(oracle)
    }

    @Test("an invalid JSON token: -32700 naming the token and where it ends")
    func invalidToken() throws {
        let (harness, oracle) = try standardServer()
        let text = #"{"jsonrpc":"2.0","id":1,"method":nope}"#
        let response = try rawResponse(harness, text)
        #expect(response.id == .null)
        let error = try #require(response.error)
        expectError(error, code: -32700, "Parse error", "invalid token", "nope")
        let tokenEnd = text.utf8.count - 1  // just past "nope"
        #expect(error.data?["position"]?.intValue == tokenEnd)
        try harness.expectServes(oracle)
    }

    @Test("an empty message and a duplicate key are parse errors too")
    func emptyAndDuplicateKey() throws {
        let (harness, oracle) = try standardServer()
        expectError(try #require(try rawResponse(harness, "").error), code: -32700, "empty message")
        let duplicate = try rawResponse(harness, #"{"jsonrpc":"2.0","id":1,"id":2,"method":"network.info"}"#)
        #expect(duplicate.id == .null)
        expectError(try #require(duplicate.error), code: -32700, "duplicate object key")
        try harness.expectServes(oracle)
    }

    struct InvalidRequest: Sendable, CustomTestStringConvertible {
        let label: String
        let body: String
        let id: JSONValue
        let fragment: String
        var testDescription: String { label }
    }

    @Test("invalid requests: -32600 naming the problem, the id echoed where it is valid", arguments: [
        InvalidRequest(label: "jsonrpc 1.0", body: #"{"jsonrpc":"1.0","id":5,"method":"network.info"}"#, id: 5,
                       fragment: #""jsonrpc" must be exactly "2.0""#),
        InvalidRequest(label: "jsonrpc 2 (a number)", body: #"{"jsonrpc":2.0,"id":"s","method":"network.info"}"#, id: "s",
                       fragment: #""jsonrpc" must be exactly "2.0""#),
        InvalidRequest(label: "missing jsonrpc", body: #"{"id":6,"method":"network.info"}"#, id: 6,
                       fragment: #""jsonrpc" must be exactly "2.0""#),
        InvalidRequest(label: "method a number", body: #"{"jsonrpc":"2.0","id":7,"method":42}"#, id: 7,
                       fragment: #""method" must be a string"#),
        InvalidRequest(label: "method missing", body: #"{"jsonrpc":"2.0","id":8}"#, id: 8,
                       fragment: #""method" must be a string"#),
        InvalidRequest(label: "params a string", body: #"{"jsonrpc":"2.0","id":9,"method":"network.info","params":"x"}"#, id: 9,
                       fragment: #""params" must be an array or an object, got a string"#),
        InvalidRequest(label: "params a number", body: #"{"jsonrpc":"2.0","id":10,"method":"network.info","params":3}"#, id: 10,
                       fragment: #""params" must be an array or an object, got a number"#),
        InvalidRequest(label: "id an object", body: #"{"jsonrpc":"2.0","id":{"a":1},"method":"network.info"}"#, id: .null,
                       fragment: "id must be a string, a number or null, got an object"),
        InvalidRequest(label: "id an array", body: #"{"jsonrpc":"2.0","id":[1],"method":"network.info"}"#, id: .null,
                       fragment: "id must be a string, a number or null, got an array"),
        InvalidRequest(label: "id a boolean", body: #"{"jsonrpc":"2.0","id":true,"method":"network.info"}"#, id: .null,
                       fragment: "id must be a string, a number or null, got a boolean"),
        InvalidRequest(label: "a bare number", body: "42", id: .null, fragment: "a request must be an object, got a number"),
        InvalidRequest(label: "a bare string", body: #""network.info""#, id: .null, fragment: "a request must be an object, got a string"),
    ])
    func invalidRequest(_ bad: InvalidRequest) throws {
        let (harness, oracle) = try standardServer()
        let response = try rawResponse(harness, bad.body)
        #expect(response.id == bad.id)
        expectError(try #require(response.error), code: -32600, "Invalid Request", bad.fragment)
        try harness.expectServes(oracle)
    }

    @Test("ids are echoed exactly: strings, integers beyond 2^53, reals, null", arguments: [
        #""a-string""#, "9007199254740993", "-7", "1.5", "null", "0",
    ])
    func idEcho(_ idText: String) throws {
        let (harness, oracle) = try standardServer()
        let bytes = try #require(harness.process("{\"jsonrpc\":\"2.0\",\"id\":\(idText),\"method\":\"network.info\"}"))
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(text.hasPrefix("{\"jsonrpc\":\"2.0\",\"id\":\(idText),\"result\":"), "\(text.prefix(80))")
        try harness.expectServes(oracle)
    }

    @Test("an unknown method and an rpc.* method: -32601 naming the method", arguments: ["network.frobnicate", "rpc.foo", "Forward", ""])
    func unknownMethod(_ method: String) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error(method, [:])
        expectError(error, code: -32601, "Method not found: \(method)")
        #expect(error.data?["method"] == .string(method))
        try harness.expectServes(oracle)
    }

    @Test("a call before initialize: -32000 naming the method; initialize then works")
    func beforeInitialize() throws {
        let harness = try ServerHarness(initialize: false)
        let params: JSONValue = ["layers": [standardLayers[0].json()], "options": ["lora_dim": 4, "alpha": 2.0]]
        for method in ["network.create", "network.info", "forward", "arena.create", "optimizer.step"] {
            let error = try harness.error(method, method == "network.create" ? params : [:])
            expectError(error, code: -32000, "Not initialized", "call initialize before \(method)")
            #expect(error.data?["method"] == .string(method))
        }
        // Methods that do not exist are still -32601 before initialize.
        #expect(try harness.error("nope").code == -32601)
        try harness.result("initialize", ["protocol_version": "1.0"])
        let oracle = try OracleNetwork.create(in: harness)
        try harness.expectServes(oracle)
    }

    @Test("protocol_version 2.0 at initialize: -32602, the server stays uninitialized, 1.x then works")
    func incompatibleProtocolVersion() throws {
        let harness = try ServerHarness(initialize: false)
        let error = try harness.error("initialize", ["protocol_version": "2.0"])
        expectError(error, code: -32602, "protocol_version 2.0 is not compatible with 1.0", path: "protocol_version")
        expectError(try harness.error("network.info"), code: -32000, "call initialize before network.info")
        let wrongType = try harness.error("initialize", ["protocol_version": 1])
        expectError(wrongType, code: -32602, "protocol_version must be a string, got a number", path: "protocol_version")
        let result = try harness.result("initialize", ["protocol_version": "1.7"])
        #expect(result["protocol_version"] == "1.0")
        let oracle = try OracleNetwork.create(in: harness)
        try harness.expectServes(oracle)
    }

    @Test("an empty batch: one -32600 object (not an array)")
    func emptyBatch() throws {
        let (harness, oracle) = try standardServer()
        let bytes = try #require(harness.process("[]"))
        let json = try JanssonCodec.decode(bytes)
        #expect(json.arrayValue == nil)
        let response = try WireResponse(json)
        #expect(response.id == .null)
        expectError(try #require(response.error), code: -32600, "an empty batch")
        try harness.expectServes(oracle)
    }

    @Test("a batch mixing valid, invalid and notification members: every request answered, in order")
    func mixedBatch() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let batch: JSONValue = [
            rpcRequest("a", "forward", ["calls": [["module": "lin", "input": Wire.tensor(x)]]]),
            42,
            rpcRequest("b", "nope"),
            rpcRequest(nil, "network.set_multiplier", ["multiplier": 2.0]),  // notification: no response
            ["jsonrpc": "1.0", "id": "c", "method": "network.info"],
            rpcRequest("d", "forward", ["calls": [["module": "lin", "input": Wire.tensor(randomTensor([2, 3, 15], seed: 1))]]]),
            rpcRequest("e", "forward", ["calls": [["module": "lin", "input": Wire.tensor(x)]]]),
        ]
        let reply = try #require(try harness.process(batch))
        let responses = try #require(reply.arrayValue).map { try WireResponse($0) }
        try #require(responses.count == 6)
        #expect(responses.map(\.id) == ["a", .null, "b", "c", "d", "e"])
        let expected = try oracle.delta("lin", x)
        expectClose(try Wire.decode(responses[0].result?["results"]?[0]?["output"]), expected, "batch member a")
        #expect(responses[1].error?.code == -32600)
        #expect(responses[1].error?.message.contains("a request must be an object, got a number") == true)
        #expect(responses[2].error?.code == -32601)
        #expect(responses[3].error?.code == -32600)
        #expect(responses[4].error?.code == -32002)
        // The notification ran, in order: member e sees the multiplier 2.
        expectClose(try Wire.decode(responses[5].result?["results"]?[0]?["output"]), expected * 2, "batch member e after the notification")
    }

    @Test("a batch of notifications only: no output at all, even when some fail; they still run")
    func notificationOnlyBatch() throws {
        let (harness, oracle) = try standardServer()
        let batch: JSONValue = [
            rpcRequest(nil, "network.set_multiplier", ["multiplier": 3.0]),
            rpcRequest(nil, "no.such.method"),
            rpcRequest(nil, "forward", ["calls": [["module": "missing", "input": Wire.tensor(Self.linInput)]]]),
        ]
        #expect(harness.process(JanssonCodec.encode(batch)) == nil)
        let y = try harness.forward("lin", Self.linInput)
        expectClose(y, try oracle.delta("lin", Self.linInput) * 3, "forward after the notifications")
    }

    @Test("a failing notification: no output", arguments: [
        rpcRequest(nil, "nope"),
        rpcRequest(nil, "forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: "F32", shape: [1], base64: "AAD/fw==")]]]),
        rpcRequest(nil, "network.create", ["layers": []]),
        rpcRequest(nil, "parameters.set", ["parameters": ["lin.nope": Wire.tensor(Tensor(scalar: 1))]]),
    ])
    func failingNotification(_ notification: JSONValue) throws {
        let (harness, oracle) = try standardServer()
        #expect(harness.process(JanssonCodec.encode(notification)) == nil)
        try harness.expectServes(oracle)
    }

    @Test("params as an array: -32602 asking for named parameters")
    func paramsArray() throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("forward", [[["module": "lin"]]])
        expectError(error, code: -32602, "named parameters (an object), not an array", path: "params")
        try harness.expectServes(oracle)
    }

    struct ParamProblem: Sendable, CustomTestStringConvertible {
        let label: String
        let method: String
        let params: JSONValue
        let code: Int
        let fragment: String
        let path: String
        var testDescription: String { label }
    }

    @Test("missing and mistyped parameters: -32602 naming the parameter's path", arguments: [
        ParamProblem(label: "forward without calls", method: "forward", params: [:], code: -32602, fragment: "missing calls", path: "calls"),
        ParamProblem(label: "calls[0] without module", method: "forward", params: ["calls": [["input": Wire.tensor(BadInputTests.linInput)]]],
                     code: -32602, fragment: "missing calls[0].module", path: "calls[0].module"),
        ParamProblem(label: "calls[0] without input", method: "forward", params: ["calls": [["module": "lin"]]],
                     code: -32602, fragment: "missing calls[0].input", path: "calls[0].input"),
        ParamProblem(label: "seed a string", method: "network.seed", params: ["seed": "7"],
                     code: -32602, fragment: "seed must be an integer, got a string", path: "seed"),
        ParamProblem(label: "seed a fraction", method: "network.seed", params: ["seed": 7.5],
                     code: -32602, fragment: "seed must be an integer, got a number", path: "seed"),
        ParamProblem(label: "seed negative", method: "network.seed", params: ["seed": -1],
                     code: -32602, fragment: "seed must be non-negative", path: "seed"),
        ParamProblem(label: "calls an object", method: "forward", params: ["calls": ["module": "lin"]],
                     code: -32602, fragment: "calls must be an array, got an object", path: "calls"),
        ParamProblem(label: "full a string", method: "forward",
                     params: ["calls": [["module": "lin", "input": Wire.tensor(BadInputTests.linInput), "full": "yes"]]],
                     code: -32602, fragment: "calls[0].full must be a boolean, got a string", path: "calls[0].full"),
        ParamProblem(label: "training a number", method: "network.set_training", params: ["training": 1],
                     code: -32602, fragment: "training must be a boolean, got a number", path: "training"),
        ParamProblem(label: "multiplier a string", method: "network.set_multiplier", params: ["multiplier": "2"],
                     code: -32602, fragment: "multiplier must be a number, got a string", path: "multiplier"),
        ParamProblem(label: "shape with a string extent", method: "forward",
                     params: ["calls": [["module": "lin", "input": ["dtype": "F32", "shape": [2, "3", 16], "data": ""]]]],
                     code: -32602, fragment: "calls[0].input.shape[1] must be an integer", path: "calls[0].input.shape[1]"),
        ParamProblem(label: "keys not strings", method: "parameters.get", params: ["keys": [1]],
                     code: -32602, fragment: "keys[0] must be a string", path: "keys[0]"),
        ParamProblem(label: "optimizer type unknown", method: "optimizer.create", params: ["type": "lion", "lr": 0.1],
                     code: -32602, fragment: "type must be adamw or sgd, got \"lion\"", path: "type"),
        ParamProblem(label: "optimizer lr negative", method: "optimizer.create", params: ["type": "sgd", "lr": -0.1],
                     code: -32602, fragment: "lr must be non-negative", path: "lr"),
        ParamProblem(label: "optimizer betas out of range", method: "optimizer.create", params: ["lr": 0.1, "betas": [0.9, 1.0]],
                     code: -32602, fragment: "betas must be two numbers in [0, 1)", path: "betas"),
        ParamProblem(label: "optimizer betas with a string among them", method: "optimizer.create", params: ["lr": 0.1, "betas": [0.9, "x", 0.99]],
                     code: -32602, fragment: "betas must be two numbers in [0, 1)", path: "betas"),
        ParamProblem(label: "save dtype F64", method: "network.save", params: ["path": "/nonexistent/x.safetensors", "dtype": "F64"],
                     code: -32003, fragment: "files are saved as F32, F16 or BF16, not F64", path: "dtype"),
        ParamProblem(label: "save metadata not a string", method: "network.save", params: ["path": "/nonexistent/x.safetensors", "metadata": ["a": 1]],
                     code: -32602, fragment: "metadata.a must be a string", path: "metadata.a"),
    ])
    func parameterProblem(_ problem: ParamProblem) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error(problem.method, problem.params)
        expectError(error, code: problem.code, problem.fragment, path: problem.path)
        try harness.expectServes(oracle)
    }

    @Test("a number that overflows Float is not finite: -32602 (multiplier, lr)")
    func numberOverflowingFloat() throws {
        let (harness, oracle) = try standardServer()
        // 1e39 is a finite Double but +inf as a Float, and the server computes in Float.
        let response = try harness.call("network.set_multiplier", ["multiplier": 1e39])
        #expect(response.error?.code == -32602, "accepted: result \(String(describing: response.result))")
        #expect(response.error?.message.contains("multiplier must be finite") == true)
        // Whatever happened, the outputs must stay finite and equal to the oracle's.
        let y = try harness.forward("lin", Self.linInput)
        #expect(y.isFinite, "the multiplier became +inf: forward returns non-finite values")
        try harness.expectServes(oracle)
        let optimizer = try harness.call("optimizer.create", ["type": "sgd", "lr": 1e39])
        #expect(optimizer.error?.code == -32602, "lr 1e39 accepted")
    }

    // MARK: - Modules, shapes, dtypes

    @Test("an unknown module in forward: -32001 naming it, nothing computed")
    func unknownModule() throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("forward", ["calls": [["module": "lin_nope", "input": Wire.tensor(Self.linInput)]]])
        expectError(error, code: -32001, "Unknown module: lin_nope")
        #expect(error.data == ["module": "lin_nope"])
        let dw = try harness.error("delta_weight", ["modules": ["lin", "nope"]])
        expectError(dw, code: -32001, "Unknown module: nope")
        try harness.expectServes(oracle)
    }

    @Test("an unknown parameter key in parameters.set: -32001, and no other key of the call is applied",
          arguments: ["lin.lora_side.weight", "lin", "nope.lora_up.weight", ".lora_up.weight", "lin."])
    func unknownParameter(_ key: String) throws {
        let (harness, oracle) = try standardServer()
        let before = try harness.parameters()
        var parameters: JSONObject = ["lin.lora_up.weight": Wire.tensor(Tensor.zeros([24, 4]))]
        parameters[key] = Wire.tensor(Tensor.zeros([4]))
        let error = try harness.error("parameters.set", ["parameters": .object(parameters)])
        if key.hasPrefix("nope.") {
            expectError(error, code: -32001, "Unknown module: nope")
            #expect(error.data == ["module": "nope"])
        } else {
            expectError(error, code: -32001, "Unknown parameter: \(key)")
            #expect(error.data == ["parameter": .string(key)])
        }
        #expect(try harness.parameters() == before)
        try harness.expectServes(oracle)
    }

    struct ShapeProblem: Sendable, CustomTestStringConvertible {
        let module: String
        let shape: [Int]
        let fragment: String
        var testDescription: String { "\(module) \(shape)" }
    }

    @Test("an input of the wrong shape: -32002 naming the expected shape", arguments: [
        ShapeProblem(module: "lin", shape: [2, 3, 15], fragment: "linear input must end with 16 features, got shape [2, 3, 15]"),
        ShapeProblem(module: "lin", shape: [], fragment: "linear input must end with 16 features, got shape []"),
        ShapeProblem(module: "conv", shape: [2, 7, 5, 6], fragment: "conv2d input must be (N, 8, H, W), got shape [2, 7, 5, 6]"),
        ShapeProblem(module: "conv", shape: [8, 5, 6], fragment: "conv2d input must be (N, 8, H, W), got shape [8, 5, 6]"),
        ShapeProblem(module: "conv", shape: [1, 8, 2, 6], fragment: "conv2d input [1, 8, 2, 6] is smaller than the kernel"),
        ShapeProblem(module: "conv", shape: [1, 8, 6, 1], fragment: "conv2d input [1, 8, 6, 1] is smaller than the kernel"),
    ])
    func wrongInputShape(_ problem: ShapeProblem) throws {
        let (harness, oracle) = try standardServer()
        let x = randomTensor(problem.shape, seed: 5)
        let error = try harness.error("forward", ["calls": [["module": .string(problem.module), "input": Wire.tensor(x)]]])
        expectError(error, code: -32002, "Shape mismatch", problem.fragment, path: "calls[0].input")
        try harness.expectServes(oracle, module: problem.module)
    }

    @Test("a conv1d or conv3d input of the wrong shape: -32002 naming the expected shape", arguments: [
        ShapeProblem(module: "seq", shape: [2, 8, 5, 6], fragment: "Shape mismatch: conv1d input must be (N, 8, L), got shape [2, 8, 5, 6]"),
        ShapeProblem(module: "seq", shape: [2, 7, 9], fragment: "Shape mismatch: conv1d input must be (N, 8, L), got shape [2, 7, 9]"),
        ShapeProblem(module: "seq", shape: [8, 9], fragment: "Shape mismatch: conv1d input must be (N, 8, L), got shape [8, 9]"),
        ShapeProblem(module: "volume", shape: [2, 4, 5, 6], fragment: "Shape mismatch: conv3d input must be (N, 4, D, H, W), got shape [2, 4, 5, 6]"),
        ShapeProblem(module: "volume", shape: [2, 3, 3, 4, 5], fragment: "Shape mismatch: conv3d input must be (N, 4, D, H, W), got shape [2, 3, 3, 4, 5]"),
        ShapeProblem(module: "seq_pointwise", shape: [2, 8, 0], fragment: "Shape mismatch: conv1d input [2, 8, 0] is smaller than the kernel"),
    ])
    func wrongConvNdInputShape(_ problem: ShapeProblem) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, layers: convNdLayers)
        let x = randomTensor(problem.shape, seed: 5)
        let error = try harness.error("forward", ["calls": [["module": .string(problem.module), "input": Wire.tensor(x)]]])
        expectError(error, code: -32002, problem.fragment, path: "calls[0].input")
        try harness.expectServes(oracle, module: problem.module)
    }

    @Test("grad_output of the wrong shape: -32002, and the tape is still usable")
    func wrongGradOutputShape() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let (_, tape) = try harness.forwardTape("lin", x)
        let error = try harness.error("backward", ["calls": [["tape": .integer(tape), "grad_output": Wire.tensor(randomTensor([2, 3, 23], seed: 1))]]])
        expectError(error, code: -32002, "calls[0].grad_output has shape [2, 3, 23], expected [2, 3, 24]", path: "calls[0].grad_output")
        let g = randomTensor([2, 3, 24], seed: 2)
        let (gradInput, grads) = try harness.backward(tape: tape, g)
        let expected = try oracle.backward("lin", x, g)
        expectClose(gradInput, expected.input, "grad_input on the kept tape")
        for (key, tensor) in expected.parameters { expectClose(try #require(grads[key]), tensor, key) }
    }

    @Test("a wrong dtype name: -32003 naming it", arguments: ["F64", "I32", "float", "f32", "BOOL", "F8_E4M3"])
    func wrongDType(_ dtype: String) throws {
        let (harness, oracle) = try standardServer()
        let input = Wire.raw(dtype: dtype, shape: [2, 3, 16], base64: Wire.base64(Self.linInput.scalars))
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": input]]])
        expectError(error, code: -32003, "Dtype error", "has dtype \"\(dtype)\"", "F32, F16 or BF16", path: "calls[0].input.dtype")
        let output = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.tensor(Self.linInput), "output": ["dtype": .string(dtype)]]]])
        expectError(output, code: -32003, "has dtype \"\(dtype)\"", path: "calls[0].output.dtype")
        let get = try harness.error("parameters.get", ["dtype": .string(dtype)])
        expectError(get, code: -32003, "has dtype \"\(dtype)\"", path: "dtype")
        try harness.expectServes(oracle)
    }

    @Test("base64 that is not base64: -32602 naming the data field", arguments: ["!!!!", "AAAA*AAA", "AAA", "ÿÿÿÿ"])
    func notBase64(_ text: String) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: "F32", shape: [1, 16], base64: text)]]])
        expectError(error, code: -32602, "calls[0].input.data is not valid base64", path: "calls[0].input.data")
        try harness.expectServes(oracle)
    }

    @Test("base64 with the wrong byte count: -32002 naming both counts", arguments: [
        (DType.f32, 380), (DType.f32, 388), (DType.f16, 190), (DType.bf16, 384), (DType.f32, 0),
    ])
    func wrongByteCount(_ dtype: DType, _ byteCount: Int) throws {
        let (harness, oracle) = try standardServer()
        let text = Data(repeating: 0, count: byteCount).base64EncodedString()
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: dtype.rawValue, shape: [2, 3, 16], base64: text)]]])
        let needed = 96 * dtype.byteSize
        expectError(error, code: -32002, "calls[0].input holds \(byteCount) bytes; shape [2, 3, 16] of \(dtype.rawValue) needs \(needed)",
                    path: "calls[0].input")
        try harness.expectServes(oracle)
    }

    @Test("both offset and data, or neither: -32602", arguments: [true, false])
    func offsetAndData(_ both: Bool) throws {
        let (harness, oracle) = try standardServer()
        try harness.result("arena.create", ["size": 4096])
        var input: JSONObject = ["dtype": "F32", "shape": [2, 3, 16]]
        if both {
            input["offset"] = 0
            input["data"] = .string(Wire.base64(Self.linInput.scalars))
        }
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": .object(input)]]])
        expectError(error, code: -32602, "calls[0].input needs exactly one of \"offset\" (arena) or \"data\" (base64)", path: "calls[0].input")
        try harness.expectServes(oracle)
    }

    @Test("an arena descriptor before arena.create: -32006", arguments: ["input", "output"])
    func arenaBeforeCreate(_ which: String) throws {
        let (harness, oracle) = try standardServer()
        let call: JSONValue = which == "input"
            ? ["module": "lin", "input": ["dtype": "F32", "shape": [2, 3, 16], "offset": 0]]
            : ["module": "lin", "input": Wire.tensor(Self.linInput), "output": ["offset": 0]]
        let error = try harness.error("forward", ["calls": [call], "grad": true])
        expectError(error, code: -32006, "Arena error", "calls[0].\(which)", "none exists", "arena.create", path: "calls[0].\(which)")
        // Nothing was kept for the failed call: the next tape is the first.
        #expect(try harness.forwardTape("lin", Self.linInput).tape == 1)
        try harness.expectServes(oracle)
    }

    struct ArenaProblem: Sendable, CustomTestStringConvertible {
        let label: String
        let offset: Int
        let dtype: String
        let shape: [Int]
        let fragment: String
        var testDescription: String { label }
    }

    @Test("descriptors outside the arena, misaligned or negative: -32006 naming the bytes", arguments: [
        ArenaProblem(label: "past the end", offset: 4096 - 380, dtype: "F32", shape: [2, 3, 16],
                     fragment: "bytes 3716..<4100 lie outside the arena of 4096 bytes"),
        ArenaProblem(label: "starting at the end", offset: 4096, dtype: "F32", shape: [1, 16],
                     fragment: "bytes 4096..<4160 lie outside the arena of 4096 bytes"),
        ArenaProblem(label: "far away", offset: 1 << 40, dtype: "F32", shape: [1, 16], fragment: "lie outside the arena of 4096 bytes"),
        ArenaProblem(label: "end overflowing Int", offset: Int(Int64.max) - 7, dtype: "F32", shape: [1, 16], fragment: "lie outside the arena"),
        ArenaProblem(label: "misaligned F32", offset: 2, dtype: "F32", shape: [1, 16], fragment: "offset 2 is not aligned to 4 bytes (F32)"),
        ArenaProblem(label: "misaligned F16", offset: 3, dtype: "F16", shape: [1, 16], fragment: "offset 3 is not aligned to 2 bytes (F16)"),
        ArenaProblem(label: "negative", offset: -4, dtype: "F32", shape: [1, 16], fragment: "offset -4 or size is invalid"),
        ArenaProblem(label: "byte count overflowing", offset: 0, dtype: "F32", shape: [1 << 57, 16], fragment: "offset 0 or size is invalid"),
    ])
    func arenaDescriptorProblem(_ problem: ArenaProblem) throws {
        let (harness, oracle) = try standardServer()
        try harness.result("arena.create", ["size": 4096])
        let input: JSONValue = ["dtype": .string(problem.dtype), "shape": JSONValue(problem.shape), "offset": .integer(Int64(problem.offset))]
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": input]], "grad": true])
        expectError(error, code: -32006, "Arena error", "calls[0].input", problem.fragment, path: "calls[0].input")
        // The same offset as an output destination (for an output of [1, 24] or [2, 3, 24]).
        if problem.shape.product < 1 << 20 {
            let output: JSONValue = ["dtype": .string(problem.dtype), "offset": .integer(Int64(problem.offset))]
            let x = randomTensor(Array(problem.shape.dropLast()) + [16], seed: 3)
            let outError = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.tensor(x), "output": output]]])
            #expect(outError.code == -32006, "\(outError)")
            #expect(outError.path == "calls[0].output")
        }
        #expect(try harness.forwardTape("lin", Self.linInput).tape == 1)
        try harness.expectServes(oracle)
    }

    @Test("a huge shape whose element count overflows: -32602", arguments: [
        [1 << 40, 1 << 40, 16], [Int(Int64.max), 2, 16], [1 << 31, 1 << 31, 1 << 2, 16],
    ])
    func hugeShape(_ shape: [Int]) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: "F32", shape: shape, base64: "")]]])
        expectError(error, code: -32602, "calls[0].input.shape is too large", path: "calls[0].input.shape")
        try harness.expectServes(oracle)
    }

    @Test("a negative extent: -32602", arguments: [[-1, 16], [2, -3, 16], [Int(Int64.min), 16]])
    func negativeShape(_ shape: [Int]) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: "F32", shape: shape, base64: "")]]])
        expectError(error, code: -32602, "calls[0].input.shape has a negative extent", path: "calls[0].input.shape")
        try harness.expectServes(oracle)
    }

    // MARK: - Non-finite values

    @Test("NaN or ±inf in an input: -32004 with the path, the count, the module and the pass", arguments: [DType.f32, .f16, .bf16])
    func nonFiniteInput(_ dtype: DType) throws {
        let (harness, oracle) = try standardServer()
        var x = Self.linInput
        x.scalars[3] = .nan
        x.scalars[17] = .infinity
        x.scalars[40] = -.infinity
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.tensor(x, dtype: dtype)]], "grad": true])
        expectError(error, code: -32004, "Non-finite values: calls[0].input (module lin, forward) has 3 NaN or infinite elements")
        #expect(error.data == ["path": "calls[0].input", "count": 3, "module": "lin", "pass": "forward"])
        #expect(try harness.forwardTape("lin", Self.linInput).tape == 1)
        try harness.expectServes(oracle)
    }

    @Test("F16 input: the largest finite value is accepted, F16 +inf is not")
    func f16Limits() throws {
        let (harness, oracle) = try standardServer()
        var x = Tensor.zeros([1, 16])
        x.scalars[0] = 65504
        let y = try harness.forward("lin", x, dtype: .f16, extra: ["output": ["dtype": "F32"]])
        expectClose(y, try oracle.delta("lin", x), tolerance: 1e-3, "forward of F16 65504")
        // 0x7C00 is +inf in F16.
        let bits = Data([0x00, 0x7C] + [UInt8](repeating: 0, count: 30)).base64EncodedString()
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: "F16", shape: [1, 16], base64: bits)]]])
        expectError(error, code: -32004, "calls[0].input (module lin, forward) has 1 NaN or infinite elements")
    }

    @Test("+inf in grad_output: -32004, and the tape survives for a valid backward")
    func nonFiniteGradOutput() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let (_, tape) = try harness.forwardTape("lin", x)
        var g = randomTensor([2, 3, 24], seed: 9)
        g.scalars[5] = .infinity
        let error = try harness.error("backward", ["calls": [["tape": .integer(tape), "grad_output": Wire.tensor(g)]]])
        expectError(error, code: -32004, "calls[0].grad_output (module lin, backward) has 1 NaN or infinite elements")
        #expect(error.data == ["path": "calls[0].grad_output", "count": 1, "module": "lin", "pass": "backward"])
        // No gradient was accumulated by the failed call.
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 })
        g.scalars[5] = 0.5
        let (gradInput, _) = try harness.backward(tape: tape, g)
        expectClose(gradInput, try oracle.backward("lin", x, g).input, "grad_input after the rejected call")
    }

    @Test("NaN in parameters.set: -32004, and no parameter changes")
    func nonFiniteParameter() throws {
        let (harness, oracle) = try standardServer()
        let before = try harness.parameters()
        var bad = Tensor.zeros([4, 16])
        bad.scalars[7] = .nan
        let error = try harness.error("parameters.set", ["parameters": [
            "lin.lora_up.weight": Wire.tensor(Tensor.zeros([24, 4])),
            "lin.lora_down.weight": Wire.tensor(bad),
        ]])
        expectError(error, code: -32004, "parameters.lin.lora_down.weight (module lin, parameters) has 1 NaN or infinite elements",
                    path: "parameters.lin.lora_down.weight")
        #expect(error.data?["module"] == "lin" && error.data?["pass"] == "parameters")
        #expect(try harness.parameters() == before)
        try harness.expectServes(oracle)
    }

    @Test("a parameter of the wrong shape in parameters.set: -32002 naming both shapes")
    func wrongParameterShape() throws {
        let (harness, oracle) = try standardServer()
        let before = try harness.parameters()
        let error = try harness.error("parameters.set", ["parameters": ["lin.lora_down.weight": Wire.tensor(Tensor.zeros([16, 4]))]])
        expectError(error, code: -32002, "lin.lora_down.weight", "[4, 16]", "[16, 4]", path: "parameters.lin.lora_down.weight")
        #expect(try harness.parameters() == before)
        try harness.expectServes(oracle)
    }

    // MARK: - Tapes

    @Test("an unknown tape: -32001 naming it", arguments: [999, 0, -1])
    func unknownTape(_ tape: Int) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("backward", ["calls": [["tape": JSONValue(tape), "grad_output": Wire.tensor(Tensor.zeros([2, 3, 24]))]]])
        expectError(error, code: -32001, "Unknown tape: \(tape)")
        #expect(error.data == ["tape": .string("\(tape)")])
        try harness.expectServes(oracle)
    }

    @Test("a tape used twice: the second use is -32001; twice in one batch consumes nothing")
    func tapeUsedTwice() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let g = randomTensor([2, 3, 24], seed: 12)
        let (_, tape) = try harness.forwardTape("lin", x)
        let call: JSONValue = ["tape": .integer(tape), "grad_output": Wire.tensor(g)]
        let twice = try harness.error("backward", ["calls": [call, call]])
        expectError(twice, code: -32001, "Unknown tape: \(tape)")
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 }, "the batch accumulated gradients")
        let (gradInput, _) = try harness.backward(tape: tape, g)
        expectClose(gradInput, try oracle.backward("lin", x, g).input, "first use")
        let again = try harness.error("backward", ["calls": [call]])
        expectError(again, code: -32001, "Unknown tape: \(tape)")
        try harness.expectServes(oracle)
    }

    @Test("backward on a delta_weight tape and delta_weight_backward on a forward tape: -32007, tapes kept")
    func tapeKinds() throws {
        let (harness, oracle) = try standardServer()
        let dw = try harness.result("delta_weight", ["modules": ["lin"], "grad": true])
        let dwTape = try #require(dw["results"]?[0]?["tape"]?.intValue)
        let (_, forwardTape) = try harness.forwardTape("lin", Self.linInput)
        let wrong1 = try harness.error("backward", ["calls": [["tape": JSONValue(dwTape), "grad_output": Wire.tensor(Tensor.zeros([24, 16]))]]])
        expectError(wrong1, code: -32007, "tape \(dwTape) belongs to delta_weight; use delta_weight_backward")
        let wrong2 = try harness.error("delta_weight_backward", ["calls": [["tape": .integer(forwardTape), "grad": Wire.tensor(Tensor.zeros([24, 16]))]]])
        expectError(wrong2, code: -32007, "tape \(forwardTape) belongs to forward; use backward")
        // Both tapes still work with the right method.
        try harness.result("delta_weight_backward", ["calls": [["tape": JSONValue(dwTape), "grad": Wire.tensor(randomTensor([24, 16], seed: 1))]]])
        _ = try harness.backward(tape: forwardTape, randomTensor([2, 3, 24], seed: 2))
        // A ΔW gradient of the wrong shape.
        let dw2 = try harness.result("delta_weight", ["modules": ["conv"], "grad": true])
        let tape2 = try #require(dw2["results"]?[0]?["tape"]?.intValue)
        let shape = try harness.error("delta_weight_backward", ["calls": [["tape": JSONValue(tape2), "grad": Wire.tensor(Tensor.zeros([12, 8, 3, 1]))]]])
        expectError(shape, code: -32002, "calls[0].grad has shape [12, 8, 3, 1], expected [12, 8, 3, 3]", path: "calls[0].grad")
        try harness.expectServes(oracle)
    }

    @Test("a forward batch with one bad call changes nothing: no tape created, none consumed, no random draw")
    func forwardBatchAtomic() throws {
        let harness = try ServerHarness()
        let config = AdapterConfig.make("lora rank dropout", "lora", ["lora_dim": 4, "alpha": 2.0, "rank_dropout": 0.5]) {
            $0.rank = 4; $0.alpha = 2; $0.rankDropout = 0.5
        }
        let oracle = try OracleNetwork.create(in: harness, config: config)
        let x = Self.linInput
        let (_, first) = try harness.forwardTape("lin", x)
        #expect(first == 1)
        try harness.result("network.set_training", ["training": true])
        try harness.result("network.seed", ["seed": 77])
        let error = try harness.error("forward", ["calls": [
            ["module": "lin", "input": Wire.tensor(x)],
            ["module": "conv", "input": Wire.tensor(randomTensor([2, 8, 5, 6], seed: 1))],
            ["module": "conv", "input": Wire.tensor(randomTensor([2, 7, 5, 6], seed: 1))],
        ]])
        expectError(error, code: -32002, path: "calls[2].input")
        // The next forward draws the dropout mask the seed gives to the first draw, and gets tape 2.
        let result = try harness.result("forward", ["calls": [["module": "lin", "input": Wire.tensor(x)]]])
        #expect(result["results"]?[0]?["tape"] == 2)
        var random = RandomSource(seed: 77)
        var module = oracle["lin"]
        module.isTraining = true
        let tape = module.makeTape(inputShape: x.shape, random: &random)
        expectClose(try Wire.decode(result["results"]?[0]?["output"]), try module.forwardDelta(x, tape: tape), "training forward after the failed batch")
        // The tape made before the failed batch still works (eval-mode tape: no mask).
        try harness.result("network.set_training", ["training": false])
        let g = randomTensor([2, 3, 24], seed: 5)
        let (gradInput, _) = try harness.backward(tape: first, g)
        expectClose(gradInput, try oracle.backward("lin", x, g).input, "backward on the earlier tape")
    }

    @Test("a forward batch whose second call has a bad output spec creates no tape for the first")
    func forwardBatchBadOutputSpec() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let error = try harness.error("forward", ["calls": [
            ["module": "lin", "input": Wire.tensor(x)],
            ["module": "lin", "input": Wire.tensor(x), "output": ["dtype": "F64"]],
        ], "grad": true])
        expectError(error, code: -32003, "has dtype \"F64\"", path: "calls[1].output.dtype")
        // "Validate every call before computing any, so a bad call changes nothing": the
        // next tape must be the first one.
        #expect(try harness.forwardTape("lin", x).tape == 1, "the failed batch left a tape behind")
        try harness.expectServes(oracle)
    }

    @Test("a delta_weight call whose second output spec is bad creates no tape for the first module")
    func deltaWeightBadOutputSpec() throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("delta_weight", ["modules": ["lin", "conv"], "grad": true, "outputs": ["conv": ["dtype": "F64"]]])
        expectError(error, code: -32003, "has dtype \"F64\"", path: "outputs.conv.dtype")
        let next = try harness.result("delta_weight", ["modules": ["lin"], "grad": true])
        #expect(next["results"]?[0]?["tape"] == 1, "the failed call left a tape behind")
        try harness.expectServes(oracle)
    }

    @Test("parameters.get and gradients.get of an unknown key: -32001")
    func getUnknownKey() throws {
        let (harness, oracle) = try standardServer()
        for method in ["parameters.get", "gradients.get"] {
            let error = try harness.error(method, ["keys": ["lin.lora_up.weight", "lin.lora_mid.weight"]])
            expectError(error, code: -32001, "Unknown parameter: lin.lora_mid.weight")
            #expect(error.data == ["parameter": "lin.lora_mid.weight"])
        }
        try harness.expectServes(oracle)
    }

    @Test("a backward batch whose second call has a bad grad_input spec consumes no tape and accumulates nothing")
    func backwardBatchBadOutputSpec() throws {
        let (harness, oracle) = try standardServer()
        let x = Self.linInput
        let (_, tape1) = try harness.forwardTape("lin", x)
        let (_, tape2) = try harness.forwardTape("lin", x)
        let g = randomTensor([2, 3, 24], seed: 21)
        let error = try harness.error("backward", ["calls": [
            ["tape": .integer(tape1), "grad_output": Wire.tensor(g)],
            ["tape": .integer(tape2), "grad_output": Wire.tensor(g), "grad_input": ["dtype": "I32"]],
        ]])
        expectError(error, code: -32003, "has dtype \"I32\"", path: "calls[1].grad_input.dtype")
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 }, "the failed batch accumulated gradients")
        // Both tapes are still there.
        for tape in [tape1, tape2] {
            let response = try harness.call("backward", ["calls": [["tape": .integer(tape), "grad_output": Wire.tensor(g)]]])
            #expect(response.error == nil, "tape \(tape) was consumed by the failed batch: \(String(describing: response.error))")
        }
        try harness.expectServes(oracle)
    }

    // MARK: - network.create

    @Test("a second network.create: -32007, the first network intact")
    func duplicateCreate() throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("network.create", ["layers": [TestLayer.linear("other", in: 4, out: 4, seed: 1).json()]])
        expectError(error, code: -32007, "a network exists already")
        let info = try harness.result("network.info")
        #expect(info["modules"]?.arrayValue?.compactMap { $0["name"]?.stringValue } == ["lin", "conv"])
        try harness.expectServes(oracle)
    }

    struct CreateProblem: Sendable, CustomTestStringConvertible {
        let label: String
        let params: JSONValue
        let code: Int
        let fragments: [String]
        let path: String?
        var testDescription: String { label }
    }

    static let lin = standardLayers[0]

    @Test("network.create with a bad description: exact code, named problem, and no network is left behind", arguments: [
        CreateProblem(label: "unknown algorithm", params: ["algo": "lorax", "layers": [lin.json()]],
                      code: -32008, fragments: ["unknown algorithm \"lorax\""], path: "algo"),
        CreateProblem(label: "unknown algorithm in a layer", params: ["layers": [lin.json(extra: ["algo": "boft2"])]],
                      code: -32008, fragments: ["unknown algorithm \"boft2\""], path: "layers[0].algo"),
        CreateProblem(label: "glora (not computed)", params: ["algo": "glora", "layers": [lin.json()]],
                      code: -32008, fragments: ["algorithm glora is recognised but not computed"], path: "algo"),
        CreateProblem(label: "full (not computed)", params: ["algo": "full", "layers": [lin.json()]],
                      code: -32008, fragments: ["algorithm full is recognised but not computed"], path: "algo"),
        CreateProblem(label: "unknown option key", params: ["layers": [lin.json(extra: ["options": ["rank": 4]])]],
                      code: -32602, fragments: ["unknown option \"rank\"", "lora_dim"], path: "layers[0].options.rank"),
        CreateProblem(label: "rank 0", params: ["layers": [lin.json(extra: ["options": ["lora_dim": 0]])]],
                      code: -32602, fragments: ["rank must be positive, got 0"], path: "layers[0].options"),
        CreateProblem(label: "rank -2", params: ["options": ["lora_dim": -2], "layers": [lin.json()]],
                      code: -32602, fragments: ["rank must be positive, got -2"], path: "layers[0].options"),
        CreateProblem(label: "dropout 1.5", params: ["layers": [lin.json(extra: ["options": ["dropout": 1.5]])]],
                      code: -32602, fragments: ["dropout must be in [0, 1), got 1.5"], path: "layers[0].options"),
        CreateProblem(label: "module_dropout 1", params: ["layers": [lin.json(extra: ["options": ["module_dropout": 1.0]])]],
                      code: -32602, fragments: ["module_dropout must be in [0, 1), got 1.0"], path: "layers[0].options"),
        CreateProblem(label: "lora_dim a string", params: ["layers": [lin.json(extra: ["options": ["lora_dim": "four"]])]],
                      code: -32602, fragments: ["option lora_dim has the wrong type"], path: "layers[0].options"),
        CreateProblem(label: "lokr factor 0", params: ["algo": "lokr", "layers": [lin.json(extra: ["options": ["factor": 0]])]],
                      code: -32602, fragments: ["factor must be -1 (automatic) or positive, got 0"], path: "layers[0].options"),
        CreateProblem(label: "dylora rank not a multiple of block_size", params: ["algo": "dylora", "options": ["lora_dim": 6, "block_size": 4], "layers": [lin.json()]],
                      code: -32008, fragments: ["lin:", "rank 6 is not a multiple of block_size 4"], path: "layers[0]"),
        CreateProblem(label: "unknown layer kind", params: ["layers": [["name": "d", "kind": "dense", "in_features": 4, "out_features": 4]]],
                      code: -32602, fragments: ["Invalid params: layers[0].kind must be linear, conv1d, conv2d, conv3d, layer_norm or group_norm, got \"dense\""],
                      path: "layers[0].kind"),
        CreateProblem(label: "conv1d kernel_size a pair", params: ["layers": [["name": "c", "kind": "conv1d", "in_channels": 8, "out_channels": 12, "kernel_size": [3, 3]]]],
                      code: -32602, fragments: ["Invalid params: layers[0].kernel_size must be an integer or an array of 1 integer, got 2 entries"],
                      path: "layers[0].kernel_size"),
        CreateProblem(label: "conv1d dilation empty", params: ["layers": [["name": "c", "kind": "conv1d", "in_channels": 8, "out_channels": 12, "dilation": []]]],
                      code: -32602, fragments: ["Invalid params: layers[0].dilation must be an integer or an array of 1 integer, got 0 entries"],
                      path: "layers[0].dilation"),
        CreateProblem(label: "conv3d stride a pair", params: ["layers": [["name": "c", "kind": "conv3d", "in_channels": 8, "out_channels": 12, "kernel_size": 3, "stride": [1, 2]]]],
                      code: -32602, fragments: ["Invalid params: layers[0].stride must be an integer or an array of 3 integers, got 2 entries"],
                      path: "layers[0].stride"),
        CreateProblem(label: "conv3d padding of four", params: ["layers": [["name": "c", "kind": "conv3d", "in_channels": 8, "out_channels": 12, "padding": [1, 1, 1, 1]]]],
                      code: -32602, fragments: ["Invalid params: layers[0].padding must be an integer or an array of 3 integers, got 4 entries"],
                      path: "layers[0].padding"),
        CreateProblem(label: "conv1d with in_features", params: ["layers": [["name": "c", "kind": "conv1d", "in_features": 8, "out_features": 12]]],
                      code: -32602, fragments: ["missing layers[0].in_channels"], path: "layers[0].in_channels"),
        CreateProblem(label: "conv3d groups not dividing channels", params: ["layers": [["name": "g", "kind": "conv3d", "in_channels": 8, "out_channels": 12, "kernel_size": 3, "groups": 3]]],
                      code: -32602, fragments: ["Invalid params: layers[0]: groups 3 must divide in_channels 8 and out_channels 12"], path: "layers[0]"),
        CreateProblem(label: "conv1d negative padding", params: ["layers": [["name": "p", "kind": "conv1d", "in_channels": 8, "out_channels": 12, "padding": -1]]],
                      code: -32602, fragments: ["Invalid params: layers[0]: kernel, stride and dilation must be positive and padding non-negative"], path: "layers[0]"),
        CreateProblem(label: "a conv3d too large to allocate", params: ["layers": [["name": "big", "kind": "conv3d", "in_channels": 65536, "out_channels": 65536, "kernel_size": 3]]],
                      code: -32602, fragments: ["weight shape [65536, 65536, 3, 3, 3] exceeds the limits"], path: "layers[0]"),
        CreateProblem(label: "zero features", params: ["layers": [["name": "z", "kind": "linear", "in_features": 0, "out_features": 4]]],
                      code: -32602, fragments: ["linear features must be positive"], path: "layers[0]"),
        CreateProblem(label: "groups not dividing channels", params: ["layers": [["name": "g", "kind": "conv2d", "in_channels": 8, "out_channels": 12, "kernel_size": 3, "groups": 3]]],
                      code: -32602, fragments: ["groups 3 must divide in_channels 8"], path: "layers[0]"),
        CreateProblem(label: "kernel_size a triple", params: ["layers": [["name": "k", "kind": "conv2d", "in_channels": 8, "out_channels": 12, "kernel_size": [3, 3, 3]]]],
                      code: -32602, fragments: ["layers[0].kernel_size must be an integer or a pair"], path: "layers[0].kernel_size"),
        CreateProblem(label: "a module name with a dot", params: ["layers": [TestLayer.linear("down.proj", in: 16, out: 24, seed: 1).json()]],
                      code: -32602, fragments: ["module name 'down.proj' must be non-empty and contain no '.'"], path: "layers[0].name"),
        CreateProblem(label: "an empty module name", params: ["layers": [TestLayer.linear("", in: 16, out: 24, seed: 1).json()]],
                      code: -32602, fragments: ["must be non-empty"], path: "layers[0].name"),
        CreateProblem(label: "a duplicate layer name", params: ["layers": [lin.json(), TestLayer.linear("lin", in: 8, out: 8, seed: 3).json()]],
                      code: -32602, fragments: ["module lin already exists"], path: "layers[1].name"),
        CreateProblem(label: "ia3 without a base weight", params: ["algo": "ia3", "layers": [lin.json(weight: false)]],
                      code: -32008, fragments: ["ia3 needs the base weight of lin"], path: "layers[0].weight"),
        CreateProblem(label: "a weight of the wrong shape", params: ["layers": [lin.json(weight: false, extra: ["weight": Wire.tensor(Tensor.zeros([16, 24]))])]],
                      code: -32002, fragments: ["layers[0].weight has shape [16, 24], the layer needs [24, 16]"], path: "layers[0].weight"),
        CreateProblem(label: "a bias of the wrong shape", params: ["layers": [lin.json(weight: false, extra: ["bias": Wire.tensor(Tensor.zeros([16]))])]],
                      code: -32002, fragments: ["layers[0].bias has shape [16], the layer needs [24]"], path: "layers[0].bias"),
        CreateProblem(label: "a weight with NaN", params: ["layers": [lin.json(weight: false, extra: ["weight": Wire.tensor(Tensor(repeating: .nan, shape: [24, 16]))])]],
                      code: -32004, fragments: ["layers[0].weight has 384 NaN or infinite elements"], path: "layers[0].weight"),
        CreateProblem(label: "a layer too large to allocate", params: ["layers": [["name": "big", "kind": "linear", "in_features": 2097152, "out_features": 2097152]]],
                      code: -32602, fragments: ["weight shape [2097152, 2097152] exceeds the limits"], path: "layers[0]"),
        CreateProblem(label: "a rank too large for the layer", params: ["layers": [lin.json(extra: ["options": ["lora_dim": 1073741824]])]],
                      code: -32602, fragments: ["lora_dim 1073741824 is too large for this layer"], path: "layers[0].options.lora_dim"),
        CreateProblem(label: "layers missing", params: ["algo": "lora"],
                      code: -32602, fragments: ["missing layers"], path: "layers"),
    ])
    func createProblem(_ problem: CreateProblem) throws {
        let harness = try ServerHarness()
        let error = try harness.error("network.create", problem.params)
        #expect(error.code == problem.code, "\(error)")
        for fragment in problem.fragments {
            #expect(error.message.contains(fragment), "\"\(error.message)\" does not name \"\(fragment)\"")
        }
        if let path = problem.path { #expect(error.path == path, "\(error)") }
        // The failed create left no network; a valid one can be created and serves.
        try harness.expectServesWithoutNetwork()
        let oracle = try OracleNetwork.create(in: harness)
        try harness.expectServes(oracle)
    }

    // MARK: - Files

    @Test("network.save to an unwritable path: -32005 naming the file; the previously saved file is intact",
          arguments: ["/proc/lycoris-server-test.safetensors", "missing-directory/x.safetensors", "existing-directory", "saved.safetensors/inside"])
    func saveUnwritable(_ target: String) throws {
        let (harness, oracle) = try standardServer()
        let saved = harness.path("saved.safetensors")
        try harness.result("network.save", ["path": .string(saved)])
        let savedBytes = try #require(fileBytes(saved))
        try FileManager.default.createDirectory(atPath: harness.path("existing-directory"), withIntermediateDirectories: false)
        // Change the parameters so a save that went through would write different bytes.
        try harness.result("parameters.set", ["parameters": ["lin.lora_up.weight": Wire.tensor(randomTensor([24, 4], seed: 1234))]])
        let path = target.hasPrefix("/") ? target : harness.path(target)
        let error = try harness.error("network.save", ["path": .string(path)])
        expectError(error, code: -32005, "I/O error")
        #expect(error.data == ["file": .string(path), "rule": "write failed"])
        #expect(fileBytes(saved) == savedBytes, "the earlier file changed")
        // No temporary file is left in the directory.
        let entries = try FileManager.default.contentsOfDirectory(atPath: harness.directory.path).sorted()
        #expect(entries == ["existing-directory", "saved.safetensors"], "\(entries)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: harness.path("existing-directory")).isEmpty)
        // The saved file still loads the old parameters.
        let fresh = try ServerHarness()
        _ = try OracleNetwork.create(in: fresh, seed: 8)
        try fresh.result("network.load", ["path": .string(saved)])
        try fresh.expectServes(oracle)
    }

    @Test("network.load of a corrupt file: -32005 naming the file and the broken rule; the network is unchanged", arguments: [
        ("bad_truncated_json.safetensors", "invalid header deserialization"),
        ("bad_header_too_large_2_63.safetensors", "header too large"),
        ("bad_size_mismatch.safetensors", "tensor invalid info"),
        ("bad_empty_file.safetensors", "header too small"),
        ("bad_overlapping_offsets.safetensors", "invalid offset"),
        ("bad_unknown_dtype.safetensors", "unknown dtype"),
        ("bad_shape_product_overflow.safetensors", "validation overflow"),
        ("bad_truncated_buffer.safetensors", "metadata incomplete buffer"),
    ])
    func loadCorrupt(_ name: String, _ rule: String) throws {
        let (harness, oracle) = try standardServer()
        let path = formatsFixture(name)
        let error = try harness.error("network.load", ["path": .string(path)])
        expectError(error, code: -32005, "I/O error", name, rule)
        let broken = rule == "unknown dtype" ? "invalid header deserialization" : rule
        #expect(error.data == ["file": .string(path), "rule": .string(broken)])
        try harness.expectServes(oracle)
        try harness.expectServes(oracle, module: "conv")
    }

    @Test("network.load of a missing file: -32005; optimizer.load too")
    func loadMissing() throws {
        let (harness, oracle) = try standardServer()
        let path = harness.path("does-not-exist.safetensors")
        let error = try harness.error("network.load", ["path": .string(path)])
        expectError(error, code: -32005, "does-not-exist.safetensors")
        #expect(error.data == ["file": .string(path), "rule": "cannot open file"])
        let optimizer = try harness.error("optimizer.load", ["path": .string(path)])
        expectError(optimizer, code: -32005, "does-not-exist.safetensors")
        try harness.expectServes(oracle)
    }

    @Test("network.load of a file that does not fit the layers: -32008, nothing replaced")
    func loadMismatchedFile() throws {
        let harness = try ServerHarness()
        // lycoris_mid_block_conv is a 1×1 conv in the file; here it is a linear layer.
        let layers = [TestLayer.linear("lycoris_mid_block_conv", in: 12, out: 12, seed: 3),
                      TestLayer.linear("lycoris_down_blocks_0_attentions_0_proj_in", in: 16, out: 24, seed: 4)]
        let oracle = try OracleNetwork.create(in: harness, layers: layers)
        let error = try harness.error("network.load", ["path": .string(networkFixture("lora"))])
        expectError(error, code: -32008, "lora_up.weight has shape [12, 4, 1, 1]")
        try harness.expectServes(oracle, module: "lycoris_down_blocks_0_attentions_0_proj_in")
        try harness.expectServes(oracle, module: "lycoris_mid_block_conv")
        // A file of an algorithm that is not computed.
        let glora = try harness.error("network.load", ["path": .string(networkFixture("glora"))])
        expectError(glora, code: -32008, "glora")
    }

    @Test("a strict network.load with modules the network lacks: -32001 listing them, nothing replaced")
    func strictLoadUnmatched() throws {
        let harness = try ServerHarness()
        let layers = [TestLayer.linear("lycoris_down_blocks_0_attentions_0_proj_in", in: 16, out: 24, seed: 4)]
        let oracle = try OracleNetwork.create(in: harness, layers: layers)
        let error = try harness.error("network.load", ["path": .string(networkFixture("lora")), "strict": true])
        expectError(error, code: -32001, "lycoris_mid_block_conv", "lycoris_down_blocks_0_resnets_0_conv1")
        #expect(!error.message.contains("proj_in"))
        try harness.expectServes(oracle, module: "lycoris_down_blocks_0_attentions_0_proj_in")
    }

    @Test("optimizer.load of a file that is not optimizer state: -32005")
    func optimizerLoadWrongFile() throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("optimizer.load", ["path": .string(networkFixture("lora"))])
        expectError(error, code: -32005, "not an optimizer state file")
        let step = try harness.error("optimizer.step")
        expectError(step, code: -32007, "no optimizer")
        try harness.expectServes(oracle)
    }

    // MARK: - Optimizer and arena state

    @Test("optimizer.step and optimizer.save before optimizer.create: -32007")
    func optimizerBeforeCreate() throws {
        let (harness, oracle) = try standardServer()
        let before = try harness.parameters()
        expectError(try harness.error("optimizer.step"), code: -32007, "no optimizer: call optimizer.create first")
        expectError(try harness.error("optimizer.save", ["path": .string(harness.path("o.safetensors"))]), code: -32007, "no optimizer")
        #expect(try harness.parameters() == before)
        #expect(!FileManager.default.fileExists(atPath: harness.path("o.safetensors")))
        try harness.expectServes(oracle)
    }

    @Test("methods that need a network, without one: -32007", arguments: [
        "network.info", "network.save", "forward", "backward", "delta_weight", "parameters.get", "parameters.set",
        "gradients.get", "gradients.zero", "optimizer.create", "network.set_multiplier", "network.load",
    ])
    func noNetwork(_ method: String) throws {
        let harness = try ServerHarness()
        let error = try harness.error(method, ["path": "/tmp/x.safetensors", "calls": [], "parameters": [:], "lr": 0.1, "multiplier": 1.0])
        expectError(error, code: -32007, "no network: call network.create first")
        let oracle = try OracleNetwork.create(in: harness)
        try harness.expectServes(oracle)
    }

    @Test("arena.create twice: -32007, the first arena keeps working")
    func arenaTwice() throws {
        let (harness, oracle) = try standardServer()
        let first = try harness.result("arena.create", ["size": 4096])
        let path = try #require(first["path"]?.stringValue)
        let error = try harness.error("arena.create", ["size": 8192])
        expectError(error, code: -32007, "an arena exists already; use arena.resize or arena.release")
        #expect(try FileManager.default.contentsOfDirectory(atPath: harness.directory.path) == [URL(fileURLWithPath: path).lastPathComponent])
        // The first arena still carries an output.
        let x = Self.linInput
        let result = try harness.result("forward", ["calls": [["module": "lin", "input": Wire.tensor(x), "output": ["offset": 0]]]])
        #expect(result["results"]?[0]?["output"] == ["dtype": "F32", "shape": [2, 3, 24], "offset": 0])
        let bytes = try #require(fileBytes(path))
        let y = bytes.prefix(144 * 4).withUnsafeBytes { decodeFloats($0, as: .f32) }
        expectClose(Tensor(shape: [2, 3, 24], scalars: y), try oracle.delta("lin", x), "output in the first arena")
    }

    @Test("arena.create with a bad size: -32006 naming the limits", arguments: [0, -1, (64 << 30) + 1])
    func arenaBadSize(_ size: Int) throws {
        let (harness, oracle) = try standardServer()
        let error = try harness.error("arena.create", ["size": JSONValue(size)])
        expectError(error, code: -32006, "size must be between 1 byte and \(64 << 30) bytes, got \(size)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: harness.directory.path).isEmpty)
        // arena.resize and arena.release without an arena.
        expectError(try harness.error("arena.resize", ["size": 4096]), code: -32006, "no arena: call arena.create first")
        expectError(try harness.error("arena.release"), code: -32006, "no arena to release")
        try harness.expectServes(oracle)
    }

    @Test("arena.create in a directory that does not exist: -32006 naming the path")
    func arenaMissingDirectory() throws {
        let (harness, oracle) = try standardServer()
        let directory = harness.path("nope")
        let error = try harness.error("arena.create", ["size": 4096, "directory": .string(directory)])
        expectError(error, code: -32006, "cannot create \(directory)/lycoris-arena-")
        #expect(error.path?.hasPrefix(directory + "/lycoris-arena-") == true)
        try harness.result("arena.create", ["size": 4096])
        try harness.expectServes(oracle)
    }

    @Test("arena.resize to a bad size: -32006, the arena unchanged")
    func arenaResizeBadSize() throws {
        let (harness, oracle) = try standardServer()
        let created = try harness.result("arena.create", ["size": 4096])
        let error = try harness.error("arena.resize", ["size": 0])
        expectError(error, code: -32006, "size must be between 1 byte")
        #expect(error.path == created["path"]?.stringValue)
        let path = try #require(created["path"]?.stringValue)
        #expect((try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) == 4096)
        try harness.expectServes(oracle)
    }
}

/// Bad inputs that could take the whole process down, sent to the real binary so that a
/// crash fails one test instead of the test runner (part of the serialized stdio suite).
extension StdioTransportTests {
    /// Sends the opening requests, then `bad` (id 10), then a valid forward (id 11); closes
    /// stdin and returns the error answered to `bad`, after checking that the forward was
    /// served and that the server exited with status 0.
    func sendBad(_ bad: JSONValue, sourceLocation: SourceLocation = #_sourceLocation) throws -> WireError? {
        let (requests, oracle) = try Self.opening()
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        try server.sendLine(bad)
        try server.sendLine(Self.forwardRequest(11))
        server.closeStdin()
        let exit = try server.waitForExit()
        #expect(exit.status == 0 && exit.reason == .exit, "the server died: \(exit); \(server.crashLine ?? "no crash message")",
                sourceLocation: sourceLocation)
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 5, "\(responses.count) responses", sourceLocation: sourceLocation)
        guard responses.count == 5 else { return nil }
        try Self.expectOpening(responses, sourceLocation: sourceLocation)
        try Self.expectForward(responses[4], id: 11, oracle: oracle, sourceLocation: sourceLocation)
        let response = try responses[3].response
        #expect(response.id == 10, sourceLocation: sourceLocation)
        return response.error
    }

    @Test("bad input over stdio: a negative seed at network.create is -32602, not a crash")
    func negativeCreateSeed() throws {
        // network.seed rejects -1 with -32602; network.create must too (on a server without a
        // network, so the seed is the only problem).
        let server = try ServerProcess()
        try server.sendLine(rpcRequest(1, "initialize"))
        try server.sendLine(rpcRequest(2, "network.create", ["seed": -1, "layers": [standardLayers[0].json()]]))
        try server.sendLine(rpcRequest(3, "network.info"))
        server.closeStdin()
        let exit = try server.waitForExit()
        #expect(exit.status == 0 && exit.reason == .exit, "the server died: \(exit); \(server.crashLine ?? "no crash message")")
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 3, "\(responses.count) responses")
        if responses.count == 3 {
            let created = try responses[1].response
            expectError(try #require(created.error), code: -32602, "seed", path: "seed")
            expectError(try #require(try responses[2].response.error), code: -32007, "no network")
        }
    }

    @Test("bad input over stdio: base64 tensors whose byte count overflows Int are refused, not a crash", arguments: [
        ("F32", [1 << 61]), ("F32", [1 << 57, 16]), ("F16", [1 << 62]), ("BF16", [1 << 58, 2, 16]),
    ])
    func byteCountOverflow(_ dtype: String, _ shape: [Int]) throws {
        let error = try sendBad(rpcRequest(10, "forward", ["calls": [["module": "lin", "input": Wire.raw(dtype: dtype, shape: shape, base64: "AAAA")]]]))
        let unwrapped = try #require(error)
        // Either "too large" (-32602) or a byte-count mismatch (-32002) names the problem.
        #expect(unwrapped.code == -32602 || unwrapped.code == -32002, "\(unwrapped)")
        #expect(unwrapped.path == "calls[0].input.shape" || unwrapped.path == "calls[0].input", "\(unwrapped)")
    }

    @Test("bad input over stdio: network.load of a file with another rank after optimizer steps, then optimizer.step")
    func rankChangeUnderOptimizer() throws {
        // A rank-8 file for the layer "lin" (written by another server).
        let writer = try ServerHarness()
        _ = try OracleNetwork.create(in: writer, config: .make("lora r8", "lora", ["lora_dim": 8, "alpha": 2.0]) { $0.rank = 8; $0.alpha = 2 },
                                             layers: [standardLayers[0]])
        let file = writer.path("rank8.safetensors")
        try writer.result("network.save", ["path": .string(file)])

        let (requests, _) = try Self.opening()  // rank 4
        let server = try ServerProcess()
        for request in requests { try server.sendLine(request) }
        let g = Wire.tensor(randomTensor([2, 3, 24], seed: 3))
        try server.sendLine(rpcRequest(4, "optimizer.create", ["type": "adamw", "lr": 0.01]))
        try server.sendLine(rpcRequest(5, "forward", ["grad": true, "calls": [["module": "lin", "input": Wire.tensor(Self.x)]]]))
        try server.sendLine(rpcRequest(6, "backward", ["calls": [["tape": 1, "grad_output": g]]]))
        try server.sendLine(rpcRequest(7, "optimizer.step"))
        try server.sendLine(rpcRequest(8, "network.load", ["path": .string(file)]))
        try server.sendLine(rpcRequest(9, "forward", ["grad": true, "calls": [["module": "lin", "input": Wire.tensor(Self.x)]]]))
        try server.sendLine(rpcRequest(10, "backward", ["calls": [["tape": 2, "grad_output": g]]]))
        try server.sendLine(rpcRequest(11, "optimizer.step"))
        try server.sendLine(Self.forwardRequest(12))
        server.closeStdin()
        let exit = try server.waitForExit()
        #expect(exit.status == 0 && exit.reason == .exit, "the server died: \(exit); \(server.crashLine ?? "no crash message")")
        let responses = try FramedResponse.parseAll(server.stdout)
        #expect(responses.count == 12, "\(responses.count) responses")
        guard responses.count == 12 else { return }
        for index in 0..<10 { #expect(try responses[index].response.error == nil, "request \(index + 1)") }
        // optimizer.step may refuse the stale state or reset it, but must answer.
        #expect(try responses[10].response.id == 11)
        let y = try Wire.decode(try responses[11].response.result?["results"]?[0]?["output"])
        #expect(y.isFinite && y.shape == [2, 3, 24])
    }

    @Test("bad input over stdio: a huge arena.create is refused and the server keeps serving")
    func hugeArena() throws {
        let error = try sendBad(rpcRequest(10, "arena.create", ["size": .integer(Int64.max)]))
        expectError(try #require(error), code: -32006, "size must be between 1 byte")
    }
}
