import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import LycorisRPC
import LycorisServer
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Process-wide serialisation

/// The server keeps a little process-global state (the arena name counter and the path the
/// signal handler unlinks), which is fine for one service per process but not for many
/// services on the test runner's parallel threads. Every in-process call, and every
/// service's teardown, goes through this lock.
let serviceLock = NSLock()

// MARK: - Responses

/// A JSON-RPC error object as the server sent it.
struct WireError: CustomStringConvertible {
    let code: Int
    let message: String
    let data: JSONValue?

    var description: String { "\(code) \(message) data=\(data.map { String(decoding: JanssonCodec.encode($0), as: UTF8.self) } ?? "none")" }

    /// `data.path`, where the server names the offending parameter.
    var path: String? { data?["path"]?.stringValue }
}

/// One JSON-RPC response object.
struct WireResponse {
    let id: JSONValue
    let result: JSONValue?
    let error: WireError?

    init(_ value: JSONValue, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let object = try #require(value.objectValue, "a response must be an object: \(value)", sourceLocation: sourceLocation)
        #expect(object["jsonrpc"] == "2.0", "response without jsonrpc 2.0: \(value)", sourceLocation: sourceLocation)
        id = try #require(object["id"], "response without id: \(value)", sourceLocation: sourceLocation)
        result = object["result"]
        if let error = object["error"] {
            let code = try #require(error["code"]?.intValue, "error without an integer code", sourceLocation: sourceLocation)
            let message = try #require(error["message"]?.stringValue, "error without a message", sourceLocation: sourceLocation)
            self.error = WireError(code: code, message: message, data: error["data"])
        } else {
            error = nil
        }
        #expect((result == nil) != (error == nil), "exactly one of result and error: \(value)", sourceLocation: sourceLocation)
    }
}

/// An unexpected error response, thrown by ``ServerHarness/result(_:_:)``.
struct UnexpectedError: Error, CustomStringConvertible {
    let method: String
    let error: WireError
    var description: String { "\(method) failed: \(error)" }
}

// MARK: - The in-process harness

/// One `LycorisService` behind `JSONRPCDispatcher.process`, fed encoded bytes exactly as the
/// stdio transport would feed it; files and arenas live in a fresh temporary directory.
final class ServerHarness: @unchecked Sendable {
    let service: LycorisService
    /// A fresh directory for this harness's arena and files (removed at the end).
    let directory: URL
    private var nextID: Int64 = 1

    init(initialize: Bool = true) throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("lycoris-server-tests-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        service = LycorisService(arenaDirectory: directory.path)
        if initialize {
            let result = try self.result("initialize", ["protocol_version": "1.0"])
            #expect(result["protocol_version"] == "1.0")
        }
    }

    deinit {
        serviceLock.withLock { service.releaseAll() }
        try? FileManager.default.removeItem(at: directory)
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Processes one raw message body; the raw response body (nil when nothing is owed).
    func process(_ body: [UInt8]) -> [UInt8]? {
        serviceLock.withLock {
            JSONRPCDispatcher.process(body, handler: { try self.service.handle(method: $0, params: $1) })
        }
    }

    func process(_ text: String) -> [UInt8]? { process(Array(text.utf8)) }

    /// Processes one message given as a JSON value; the parsed response (nil when none).
    func process(_ message: JSONValue, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSONValue? {
        guard let bytes = process(JanssonCodec.encode(message)) else { return nil }
        #expect(!bytes.contains(0x0A), "a response body must be one line", sourceLocation: sourceLocation)
        return try JanssonCodec.decode(bytes)
    }

    /// A request object with a fresh integer id.
    func request(_ method: String, _ params: JSONValue? = nil) -> (id: Int64, message: JSONValue) {
        let id = nextID
        nextID += 1
        var object: JSONObject = ["jsonrpc": "2.0", "id": .integer(id), "method": .string(method)]
        if let params { object["params"] = params }
        return (id, .object(object))
    }

    /// Sends one request and returns its response (checking that the id is echoed).
    func call(_ method: String, _ params: JSONValue? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> WireResponse {
        let (id, message) = request(method, params)
        let reply = try #require(try process(message, sourceLocation: sourceLocation), "\(method): no response", sourceLocation: sourceLocation)
        let response = try WireResponse(reply, sourceLocation: sourceLocation)
        #expect(response.id == .integer(id), "\(method): id \(response.id) echoed for \(id)", sourceLocation: sourceLocation)
        return response
    }

    /// The result of a call that must succeed.
    @discardableResult
    func result(_ method: String, _ params: JSONValue? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSONValue {
        let response = try call(method, params, sourceLocation: sourceLocation)
        if let error = response.error { throw UnexpectedError(method: method, error: error) }
        return try #require(response.result, sourceLocation: sourceLocation)
    }

    /// The error of a call that must fail.
    func error(_ method: String, _ params: JSONValue? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> WireError {
        let response = try call(method, params, sourceLocation: sourceLocation)
        return try #require(response.error, "\(method) succeeded: \(String(describing: response.result))", sourceLocation: sourceLocation)
    }
}

extension JSONValue {
    /// The element at `index` of an array (nil otherwise).
    subscript(index: Int) -> JSONValue? {
        guard case let .array(items) = self, items.indices.contains(index) else { return nil }
        return items[index]
    }
}

// MARK: - Tensors on the wire

enum Wire {
    /// A base64 descriptor of `tensor` in `dtype` (the bytes come from `encodeFloats`).
    static func tensor(_ tensor: Tensor, dtype: DType = .f32) -> JSONValue {
        let bytes = try! encodeFloats(tensor.scalars, as: dtype)
        return ["dtype": .string(dtype.rawValue), "shape": JSONValue(tensor.shape), "data": .string(Data(bytes).base64EncodedString())]
    }

    /// A descriptor with raw base64 text and any shape.
    static func raw(dtype: String, shape: [Int], base64: String) -> JSONValue {
        ["dtype": .string(dtype), "shape": JSONValue(shape), "data": .string(base64)]
    }

    /// Base64 of the little-endian bytes of `values` in `dtype`.
    static func base64(_ values: [Float], dtype: DType = .f32) -> String {
        Data(try! encodeFloats(values, as: dtype)).base64EncodedString()
    }

    /// Decodes an inline (base64) descriptor.
    static func decode(_ value: JSONValue?, sourceLocation: SourceLocation = #_sourceLocation) throws -> Tensor {
        let value = try #require(value, "missing tensor", sourceLocation: sourceLocation)
        let dtype = try #require(value["dtype"]?.stringValue.flatMap(DType.init(rawValue:)), "bad dtype in \(value)", sourceLocation: sourceLocation)
        let extents = value["shape"]?.arrayValue?.compactMap { $0.intValue }
        let shape = try #require(extents, sourceLocation: sourceLocation)
        let text = try #require(value["data"]?.stringValue, "not an inline tensor: \(value)", sourceLocation: sourceLocation)
        let data = try #require(Data(base64Encoded: text), "not base64", sourceLocation: sourceLocation)
        #expect(data.count == shape.product * dtype.byteSize, "byte count \(data.count) for \(shape) \(dtype)", sourceLocation: sourceLocation)
        let scalars = data.withUnsafeBytes { decodeFloats($0, as: dtype) }
        return Tensor(shape: shape, scalars: scalars)
    }
}

// MARK: - Networks with oracles

/// A layer of a test network: its wire description and the library's view of it.
struct TestLayer: Sendable {
    let name: String
    let spec: LayerSpec
    let weight: Tensor
    let bias: Tensor
    /// An input of the right shape.
    let inputShape: [Int]

    static func linear(_ name: String, in inFeatures: Int, out outFeatures: Int, seed: UInt64) -> TestLayer {
        TestLayer(name: name, spec: .linear(inFeatures: inFeatures, outFeatures: outFeatures),
                  weight: randomTensor([outFeatures, inFeatures], seed: seed, std: 0.3),
                  bias: randomTensor([outFeatures], seed: seed + 1, std: 0.3), inputShape: [2, 3, inFeatures])
    }

    /// A conv with `axes` spatial axes (conv1d, conv2d, conv3d) and the same kernel, padding
    /// and stride on each; inputs (2, C, 9), (2, C, 5, 6) or (2, C, 3, 4, 5).
    static func conv(_ name: String, in inChannels: Int, out outChannels: Int, kernel: Int, padding: Int = 0,
                     stride: Int = 1, axes: Int = 2, seed: UInt64) -> TestLayer {
        let geometry = ConvGeometry(inChannels: inChannels, outChannels: outChannels, kernelSize: [Int](repeating: kernel, count: axes),
                                    stride: [Int](repeating: stride, count: axes), padding: [Int](repeating: padding, count: axes))
        return TestLayer(name: name, spec: .convolution(geometry), weight: randomTensor(geometry.weightShape, seed: seed, std: 0.3),
                         bias: randomTensor([outChannels], seed: seed + 1, std: 0.3),
                         inputShape: [2, inChannels] + [[9], [5, 6], [3, 4, 5]][axes - 1])
    }

    static func norm(_ name: String, _ normalization: Normalization, inputShape: [Int], seed: UInt64) -> TestLayer {
        TestLayer(name: name, spec: .norm(normalization), weight: randomTensor(normalization.weightShape, seed: seed, std: 0.3),
                  bias: randomTensor(normalization.weightShape, seed: seed + 1, std: 0.3), inputShape: inputShape)
    }

    /// The `layers[]` entry of network.create.
    func json(weight includeWeight: Bool = true, extra: JSONObject = [:]) -> JSONValue {
        var object: JSONObject = ["name": .string(name)]
        switch spec {
        case let .linear(inFeatures, outFeatures):
            object["kind"] = "linear"
            object["in_features"] = JSONValue(inFeatures)
            object["out_features"] = JSONValue(outFeatures)
        case let .convolution(g):
            object["kind"] = .string(g.kind)
            object["in_channels"] = JSONValue(g.inChannels)
            object["out_channels"] = JSONValue(g.outChannels)
            object["kernel_size"] = JSONValue(g.kernelSize)
            object["stride"] = JSONValue(g.stride)
            object["padding"] = JSONValue(g.padding)
        case let .norm(normalization):
            switch normalization.kind {
            case let .layer(normalizedShape):
                object["kind"] = "layer_norm"
                object["normalized_shape"] = JSONValue(normalizedShape)
            case let .group(groups, channels):
                object["kind"] = "group_norm"
                object["num_groups"] = JSONValue(groups)
                object["num_channels"] = JSONValue(channels)
            }
            object["eps"] = .double(normalization.eps)
            object["has_bias"] = .bool(normalization.hasBias)
        }
        if includeWeight {
            object["weight"] = Wire.tensor(weight)
            if spec.normalization?.hasBias != false { object["bias"] = Wire.tensor(bias) }
        }
        for (key, value) in extra.members { object[key] = value }
        return .object(object)
    }
}

/// The standard two-layer network of the tests: a linear 16→24 and a 3×3 conv 8→12 without padding.
let standardLayers: [TestLayer] = [
    .linear("lin", in: 16, out: 24, seed: 100),
    .conv("conv", in: 8, out: 12, kernel: 3, seed: 200),
]

/// An adapter configuration: its wire algorithm name and options, and the same options
/// built directly for the oracle.
struct AdapterConfig: Sendable, CustomTestStringConvertible {
    let algo: String
    let optionsJSON: JSONObject
    let options: AdapterOptions
    let label: String

    var testDescription: String { label }

    var algorithm: Algorithm { algo == "lora" ? .locon : Algorithm(rawValue: algo)! }

    static func make(_ label: String, _ algo: String, _ json: JSONObject, _ configure: (inout AdapterOptions) -> Void) -> AdapterConfig {
        var options = AdapterOptions()
        configure(&options)
        return AdapterConfig(algo: algo, optionsJSON: json, options: options, label: label)
    }

    static let lora = make("lora r4 α2", "lora", ["lora_dim": 4, "alpha": 2.0]) { $0.rank = 4; $0.alpha = 2 }
}

/// A network created in a harness, with random (non-zero) parameters set through
/// parameters.set, and the library modules holding the same parameters.
struct OracleNetwork {
    var modules: [String: AdapterModule]
    let layers: [TestLayer]

    /// The network.create and parameters.set params of a network whose parameters are all
    /// random, and the library modules holding the same parameters.
    static func prepare(config: AdapterConfig = .lora, layers: [TestLayer] = standardLayers, seed: UInt64 = 7,
                        extraParams: JSONObject = [:]) throws -> (create: JSONValue, set: JSONValue, oracle: OracleNetwork) {
        var params: JSONObject = ["algo": .string(config.algo), "options": .object(config.optionsJSON), "seed": 11,
                                  "layers": .array(layers.map { $0.json() })]
        for (key, value) in extraParams.members { params[key] = value }
        var modules: [String: AdapterModule] = [:]
        var updates = JSONObject()
        var parameterSeed = seed &* 1000
        for layer in layers {
            var random = RandomSource(seed: 99)
            let adapter = try config.algorithm.makeAdapter(layer: layer.spec, options: config.options, random: &random,
                                                           baseWeight: layer.weight, hasBias: layer.spec.normalization == nil)
            var module = AdapterModule(name: layer.name, algorithm: adapter, options: config.options,
                                       baseWeight: layer.weight, baseBias: layer.spec.normalization?.hasBias == false ? nil : layer.bias)
            for (name, tensor) in adapter.parameters.entries {
                parameterSeed += 1
                // Scalars (use_scalar) at 0.75, factors near ±0.5: nothing is zero.
                var value = randomTensor(tensor.shape, seed: parameterSeed, std: 0.5)
                if name == "scalar" { value = Tensor(scalar: 0.75) }
                module.algorithm.parameters[name] = value
                updates["\(layer.name).\(name)"] = Wire.tensor(value)
            }
            modules[layer.name] = module
        }
        return (.object(params), ["parameters": .object(updates)], OracleNetwork(modules: modules, layers: layers))
    }

    /// Creates the network in `harness` and sets every parameter to a random value.
    static func create(in harness: ServerHarness, config: AdapterConfig = .lora, layers: [TestLayer] = standardLayers,
                       seed: UInt64 = 7, extraParams: JSONObject = [:], sourceLocation: SourceLocation = #_sourceLocation) throws -> OracleNetwork {
        let (create, set, oracle) = try prepare(config: config, layers: layers, seed: seed, extraParams: extraParams)
        let info = try harness.result("network.create", create, sourceLocation: sourceLocation)
        let infoModules = try #require(info["modules"]?.arrayValue, sourceLocation: sourceLocation)
        #expect(infoModules.count == layers.count, sourceLocation: sourceLocation)
        // The server lists the same parameters, with the same shapes, as the library.
        for (index, layer) in layers.enumerated() {
            let parameters = oracle[layer.name].algorithm.parameters
            let listed = infoModules[index]["parameters"]?.arrayValue ?? []
            #expect(listed.compactMap { $0["key"]?.stringValue } == parameters.names.map { "\(layer.name).\($0)" },
                    "parameters of \(layer.name)", sourceLocation: sourceLocation)
            #expect(listed.compactMap { $0["shape"]?.arrayValue?.compactMap(\.intValue) } == parameters.entries.map(\.tensor.shape),
                    sourceLocation: sourceLocation)
        }
        let result = try harness.result("parameters.set", set, sourceLocation: sourceLocation)
        #expect(result["updated"]?.intValue == set["parameters"]?.objectValue?.members.count, sourceLocation: sourceLocation)
        return oracle
    }

    subscript(name: String) -> AdapterModule { modules[name]! }

    func layer(_ name: String) -> TestLayer { layers.first { $0.name == name }! }

    /// (∂x, ∂parameters) of m·Δ(x) in eval mode, from the library, parameter keys prefixed.
    func backward(_ name: String, _ x: Tensor, _ gradOutput: Tensor) throws -> (input: Tensor, parameters: [String: Tensor]) {
        var unused = RandomSource(seed: 0)
        let module = self[name]
        let grads = try module.backwardDelta(x, gradOutput: gradOutput, tape: module.makeTape(inputShape: x.shape, random: &unused))
        var parameters: [String: Tensor] = [:]
        for (key, tensor) in grads.parameters.entries { parameters["\(name).\(key)"] = tensor }
        return (grads.input, parameters)
    }

    /// m·Δ(x) in eval mode, from the library.
    func delta(_ name: String, _ x: Tensor) throws -> Tensor {
        var unused = RandomSource(seed: 0)
        let module = self[name]
        return try module.forwardDelta(x, tape: module.makeTape(inputShape: x.shape, random: &unused))
    }
}

extension ServerHarness {
    /// One eval-mode forward of `x` through `module`: the output tensor.
    func forward(_ module: String, _ x: Tensor, dtype: DType = .f32, extra: JSONObject = [:],
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> Tensor {
        var call: JSONObject = ["module": .string(module), "input": Wire.tensor(x, dtype: dtype)]
        for (key, value) in extra.members { call[key] = value }
        let result = try self.result("forward", ["calls": [.object(call)]], sourceLocation: sourceLocation)
        let results = try #require(result["results"]?.arrayValue, sourceLocation: sourceLocation)
        try #require(results.count == 1, sourceLocation: sourceLocation)
        return try Wire.decode(results[0]["output"], sourceLocation: sourceLocation)
    }

    /// A forward that keeps its tape (`"grad": true`): (output, tape id).
    func forwardTape(_ module: String, _ x: Tensor, extra: JSONObject = [:],
                     sourceLocation: SourceLocation = #_sourceLocation) throws -> (output: Tensor, tape: Int64) {
        var call: JSONObject = ["module": .string(module), "input": Wire.tensor(x)]
        for (key, value) in extra.members { call[key] = value }
        let result = try self.result("forward", ["calls": [.object(call)], "grad": true], sourceLocation: sourceLocation)
        let first = try #require(result["results"]?.arrayValue?.first, sourceLocation: sourceLocation)
        let tape = try #require(first["tape"]?.intValue, "forward with grad returned no tape", sourceLocation: sourceLocation)
        return (try Wire.decode(first["output"], sourceLocation: sourceLocation), Int64(tape))
    }

    /// One backward call: (grad_input, returned parameter gradients by key).
    func backward(tape: Int64, _ gradOutput: Tensor, accumulate: Bool = true,
                  sourceLocation: SourceLocation = #_sourceLocation) throws -> (input: Tensor, parameters: [String: Tensor]) {
        let result = try self.result("backward", [
            "calls": [["tape": .integer(tape), "grad_output": Wire.tensor(gradOutput)]],
            "return_parameter_grads": true, "accumulate": .bool(accumulate),
        ], sourceLocation: sourceLocation)
        let first = try #require(result["results"]?.arrayValue?.first, sourceLocation: sourceLocation)
        var grads: [String: Tensor] = [:]
        for (key, value) in try #require(first["parameter_grads"]?.objectValue, sourceLocation: sourceLocation).members {
            grads[key] = try Wire.decode(value, sourceLocation: sourceLocation)
        }
        return (try Wire.decode(first["grad_input"], sourceLocation: sourceLocation), grads)
    }

    /// The server still serves: a forward through `module` equals the oracle's m·Δ(x).
    func expectServes(_ oracle: OracleNetwork, module: String = "lin", sourceLocation: SourceLocation = #_sourceLocation) throws {
        let layer = oracle.layer(module)
        let x = randomTensor(layer.inputShape, seed: 4242)
        let y = try forward(module, x, sourceLocation: sourceLocation)
        expectClose(y, try oracle.delta(module, x), "forward after the error", sourceLocation: sourceLocation)
    }

    /// The server still serves without a network: network.info names the missing network
    /// and initialize still answers.
    func expectServesWithoutNetwork(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let error = try self.error("network.info", sourceLocation: sourceLocation)
        #expect(error.code == -32007 && error.message.contains("no network"), "\(error)", sourceLocation: sourceLocation)
        let result = try self.result("initialize", sourceLocation: sourceLocation)
        #expect(result["server"]?["name"] == "lycoris-server", sourceLocation: sourceLocation)
    }

    /// Every parameter by key, decoded.
    func parameters(_ keys: [String]? = nil, dtype: String? = nil, gradients: Bool = false,
                    sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Tensor] {
        var params = JSONObject()
        if let keys { params["keys"] = .array(keys.map { .string($0) }) }
        if let dtype { params["dtype"] = .string(dtype) }
        let result = try self.result(gradients ? "gradients.get" : "parameters.get", .object(params), sourceLocation: sourceLocation)
        let object = try #require(result["parameters"]?.objectValue, sourceLocation: sourceLocation)
        var tensors: [String: Tensor] = [:]
        for (key, value) in object.members { tensors[key] = try Wire.decode(value, sourceLocation: sourceLocation) }
        return tensors
    }
}

/// Expects an error with `code` whose message contains every one of `fragments`.
func expectError(_ error: WireError, code: Int, _ fragments: String..., path: String? = nil,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(error.code == code, "code \(error.code), expected \(code): \(error.message)", sourceLocation: sourceLocation)
    for fragment in fragments {
        #expect(error.message.contains(fragment), "message \"\(error.message)\" does not name \"\(fragment)\"", sourceLocation: sourceLocation)
    }
    if let path {
        #expect(error.path == path, "data.path \(String(describing: error.path)), expected \(path)", sourceLocation: sourceLocation)
    }
}

// MARK: - Files

let testsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

func networkFixture(_ name: String) -> String {
    testsDirectory.appendingPathComponent("LycorisAlgorithmsTests/Fixtures/networks/\(name).safetensors").path
}

func formatsFixture(_ name: String) -> String {
    testsDirectory.appendingPathComponent("LycorisFormatsTests/Fixtures/\(name)").path
}

func fileBytes(_ path: String) -> Data? { FileManager.default.contents(atPath: path) }
