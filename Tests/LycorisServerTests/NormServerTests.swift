import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import LycorisRPC
import LycorisServer
import Testing

/// The norm test network: a layer norm over two axes, a group norm with spatial axes and
/// eps 1e-3, a layer norm without bias (all `norm`, named "norm" or "norms"), and the
/// standard linear layer with LoRA; the request's LoRA options reach the norm layers too,
/// which ignore them.
let normLayers: [TestLayer] = [
    .norm("ln", Normalization(kind: .layer(normalizedShape: [4, 6])), inputShape: [2, 3, 4, 6], seed: 400),
    .norm("gn", Normalization(kind: .group(groups: 2, channels: 6), eps: 1e-3), inputShape: [2, 6, 5, 3], seed: 410),
    .norm("ln_nobias", Normalization(kind: .layer(normalizedShape: [8]), hasBias: false), inputShape: [5, 8], seed: 420),
    standardLayers[0],
]

extension OracleNetwork {
    /// Creates the norm test network (every parameter random) and the library's copy of it.
    static func createNorms(in harness: ServerHarness, multiplier: Float = 0.8, seed: UInt64 = 7,
                            sourceLocation: SourceLocation = #_sourceLocation) throws -> OracleNetwork {
        let names = ["ln": "norm", "gn": "norms", "ln_nobias": "NORM", "lin": "lora"]
        let layers = normLayers.map { $0.json(extra: ["algo": .string(names[$0.name]!)]) }
        try harness.result("network.create", ["layers": .array(layers), "options": ["lora_dim": 4, "alpha": 2.0],
                                              "multiplier": JSONValue(multiplier)], sourceLocation: sourceLocation)
        var modules: [String: AdapterModule] = [:]
        var updates = JSONObject()
        var random = RandomSource(seed: 99)
        var parameterSeed = seed &* 1000
        for layer in normLayers {
            let algorithm: Algorithm = layer.spec.normalization == nil ? .locon : .norms
            let options = AdapterOptions(rank: 4, alpha: 2)
            var module = AdapterModule(name: layer.name, algorithm: try algorithm.makeAdapter(layer: layer.spec, options: options, random: &random),
                                       options: options, baseWeight: layer.weight,
                                       baseBias: layer.spec.normalization?.hasBias == false ? nil : layer.bias)
            module.multiplier = multiplier
            for (name, tensor) in module.algorithm.parameters.entries {
                parameterSeed += 1
                let value = randomTensor(tensor.shape, seed: parameterSeed, std: 0.5)
                module.algorithm.parameters[name] = value
                updates["\(layer.name).\(name)"] = Wire.tensor(value)
            }
            modules[layer.name] = module
        }
        try harness.result("parameters.set", ["parameters": .object(updates)], sourceLocation: sourceLocation)
        return OracleNetwork(modules: modules, layers: normLayers)
    }
}

@Suite("server: norm layers")
struct NormServerTests {
    static let norms = normLayers.filter { $0.spec.normalization != nil }

    @Test("network.info lists norm layers with every member and w_norm/b_norm of numel(W0)")
    func info() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.createNorms(in: harness)
        let modules = try #require(try harness.result("network.info")["modules"]?.arrayValue)
        #expect(modules.map { $0["algorithm"] } == ["norms", "norms", "norms", "locon"])
        #expect(modules[0]["layer"] == ["kind": "layer_norm", "normalized_shape": [4, 6], "eps": .double(1e-5), "has_bias": true])
        #expect(modules[1]["layer"] == ["kind": "group_norm", "num_groups": 2, "num_channels": 6, "eps": .double(1e-3), "has_bias": true])
        #expect(modules[2]["layer"] == ["kind": "layer_norm", "normalized_shape": [8], "eps": .double(1e-5), "has_bias": false])
        #expect(modules[0]["rank"] == .null && modules[0]["scale"] == .double(1))
        #expect(modules[0]["parameters"] == [["key": "ln.w_norm", "shape": [24]], ["key": "ln.b_norm", "shape": [24]]])
        // A bare integer normalized_shape and the defaults.
        let other = try ServerHarness()
        let created = try other.result("network.create", ["algo": "norm", "layers": [["name": "n", "kind": "layer_norm", "normalized_shape": 5]]])
        #expect(created["modules"]?[0]?["layer"] == ["kind": "layer_norm", "normalized_shape": [5], "eps": .double(1e-5), "has_bias": true])
    }

    @Test("forward (m·Δ(x) and full) equals the library and, by loops, x̂·(W0 + m·ΔW) + b0 + m·Δb")
    func forward() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        for (index, layer) in Self.norms.enumerated() {
            let x = randomTensor(layer.inputShape, seed: 30 + UInt64(index))
            let module = oracle[layer.name]
            let delta = try harness.forward(layer.name, x)
            expectClose(delta, try oracle.delta(layer.name, x), "Δ(x) of \(layer.name)")
            let normalization = try #require(layer.spec.normalization)
            let wNorm = module.algorithm.parameters.required("w_norm"), bNorm = module.algorithm.parameters.required("b_norm")
            let zeros = Tensor.zeros(layer.spec.biasShape)
            // Δ(x) = x̂·ΔW + Δb, Δb only with a bias; b_norm is ignored without one.
            let deltaBias = normalization.hasBias ? bNorm.reshaped(layer.spec.biasShape) * 0.8 : zeros
            expectClose(delta, naiveNorm(normalization, x, weight: wNorm.reshaped(layer.spec.weightShape) * 0.8, bias: deltaBias),
                        "Δ(x) of \(layer.name) by loops")
            let baseBias = normalization.hasBias ? layer.bias : zeros
            expectClose(try harness.forward(layer.name, x, extra: ["full": true]),
                        naiveNorm(normalization, x, weight: layer.weight + wNorm.reshaped(layer.spec.weightShape) * 0.8, bias: baseBias + deltaBias),
                        "full output of \(layer.name) by loops")
        }
    }

    @Test("backward (default and full forwards) equals the library's ∂x and ∂w_norm, ∂b_norm")
    func backward() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        for (index, layer) in Self.norms.enumerated() {
            let x = randomTensor(layer.inputShape, seed: 40 + UInt64(index))
            let g = randomTensor(layer.inputShape, seed: 50 + UInt64(index))
            let expected = try oracle.backward(layer.name, x, g)
            let (_, tape) = try harness.forwardTape(layer.name, x)
            let grads = try harness.backward(tape: tape, g)
            expectClose(grads.input, expected.input, "∂x of \(layer.name)")
            #expect(Set(grads.parameters.keys) == ["\(layer.name).w_norm", "\(layer.name).b_norm"])
            expectClose(try #require(grads.parameters["\(layer.name).w_norm"]), try #require(expected.parameters["\(layer.name).w_norm"]), "∂w_norm of \(layer.name)")
            let bias = try #require(grads.parameters["\(layer.name).b_norm"])
            if layer.spec.normalization!.hasBias {
                expectClose(bias, try #require(expected.parameters["\(layer.name).b_norm"]), "∂b_norm of \(layer.name)")
            } else {
                #expect(bias == .zeros([8]), "b_norm of a bias-free layer gets no gradient")
            }
            let module = oracle[layer.name]
            var unused = RandomSource(seed: 0)
            let full = try module.backward(x, gradOutput: g, tape: module.makeTape(inputShape: x.shape, random: &unused))
            let (_, fullTape) = try harness.forwardTape(layer.name, x, extra: ["full": true])
            expectClose(try harness.backward(tape: fullTape, g).input, full.input, "full ∂x of \(layer.name)")
        }
    }

    @Test("delta_weight answers delta_bias (m·Δb) exactly for norm modules on layers with a bias; bias_outputs and dtype apply")
    func deltaWeight() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        try harness.result("arena.create", ["size": 4096])
        let result = try harness.result("delta_weight", ["dtype": "BF16", "bias_outputs": ["gn": ["offset": 1024, "dtype": "F32"]]])
        let results = try #require(result["results"]?.arrayValue)
        #expect(results.map { $0["delta_bias"] != nil } == [true, true, false, false])
        for (index, layer) in normLayers.enumerated() {
            let deltaWeight = try #require(results[index]["delta_weight"])
            #expect(deltaWeight["dtype"] == "BF16" && deltaWeight["shape"] == JSONValue(layer.spec.weightShape))
        }
        let ln = oracle["ln"].algorithm.parameters
        let lnBias = try Wire.decode(results[0]["delta_bias"])
        #expect(results[0]["delta_bias"]?["dtype"] == "BF16" && lnBias.shape == [4, 6])
        expectClose(lnBias, ln.required("b_norm").reshaped([4, 6]) * 0.8, tolerance: 1e-2, "ln delta_bias (BF16)")
        expectClose(try Wire.decode(results[0]["delta_weight"]), ln.required("w_norm").reshaped([4, 6]) * 0.8, tolerance: 1e-2, "ln delta_weight (BF16)")
        #expect(results[1]["delta_bias"] == ["dtype": "F32", "shape": [6], "offset": 1024])
    }

    @Test("delta_weight_backward: grad_bias reaches b_norm (m·grad_bias), omitted means zero")
    func deltaWeightBackward() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.createNorms(in: harness)
        let result = try harness.result("delta_weight", ["modules": ["gn", "gn", "ln_nobias"], "grad": true])
        let tapes = try #require(result["results"]?.arrayValue).map { try #require($0["tape"]) }
        let g = randomTensor([6], seed: 1), gb = randomTensor([6], seed: 2), g8 = randomTensor([8], seed: 3)
        let backward = try harness.result("delta_weight_backward", ["return_parameter_grads": true, "calls": [
            ["tape": tapes[0], "grad": Wire.tensor(g), "grad_bias": Wire.tensor(gb)],
            ["tape": tapes[1], "grad": Wire.tensor(g)],
            ["tape": tapes[2], "grad": Wire.tensor(g8)],
        ]])
        let results = try #require(backward["results"]?.arrayValue)
        func grad(_ index: Int, _ key: String) throws -> Tensor { try Wire.decode(results[index]["parameter_grads"]?[key]) }
        expectClose(try grad(0, "gn.w_norm"), g * 0.8, "∂w_norm")
        expectClose(try grad(0, "gn.b_norm"), gb * 0.8, "∂b_norm from grad_bias")
        #expect(try grad(1, "gn.b_norm") == .zeros([6]))
        expectClose(try grad(2, "ln_nobias.w_norm"), g8 * 0.8, "∂w_norm without bias")
        expectClose(try harness.parameters(gradients: true)["gn.b_norm"]!, gb * 0.8, "accumulated ∂b_norm")
    }

    @Test("save → load in a fresh server reproduces the outputs; the file has w_norm and b_norm for every norm module")
    func saveLoad() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        let path = harness.path("norms.safetensors")
        try harness.result("network.save", ["path": .string(path)])
        let file = try AdapterFile(path: path)
        #expect(file.modules.map(\.name) == ["gn", "lin", "ln", "ln_nobias"])
        #expect(file.modules.filter { $0.algorithm == .norms }.allSatisfy { Set($0.tensors.keys) == ["w_norm", "b_norm"] })
        let fresh = try ServerHarness()
        _ = try OracleNetwork.createNorms(in: fresh, seed: 31)
        let loaded = try fresh.result("network.load", ["path": .string(path), "strict": true])
        #expect(loaded["loaded"] == ["gn", "lin", "ln", "ln_nobias"])
        for layer in normLayers {
            let x = randomTensor(layer.inputShape, seed: 90)
            expectClose(try fresh.forward(layer.name, x), try oracle.delta(layer.name, x), "reloaded \(layer.name)")
        }
    }

    @Test("gradients.get and an SGD step update w_norm and b_norm: θ − lr·g")
    func optimizer() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.createNorms(in: harness)
        let before = try harness.parameters(["ln.w_norm", "ln.b_norm"])
        let (_, tape) = try harness.forwardTape("ln", randomTensor([2, 3, 4, 6], seed: 5))
        _ = try harness.backward(tape: tape, randomTensor([2, 3, 4, 6], seed: 6))
        let grads = try harness.parameters(["ln.w_norm", "ln.b_norm"], gradients: true)
        try harness.result("optimizer.create", ["type": "sgd", "lr": 0.5])
        try harness.result("optimizer.step")
        for (key, value) in try harness.parameters(["ln.w_norm", "ln.b_norm"]) {
            expectClose(value, before[key]! - grads[key]! * 0.5, "\(key) after one step")
        }
    }

    // MARK: - Bad inputs

    struct Problem: Sendable, CustomTestStringConvertible {
        let label: String
        let layer: JSONValue
        let code: Int
        let message: String
        let path: String
        var testDescription: String { label }
    }

    static let layerNorm: JSONObject = ["name": "ln", "kind": "layer_norm", "normalized_shape": [4], "algo": "norm"]
    static let groupNorm: JSONObject = ["name": "gn", "kind": "group_norm", "num_groups": 2, "num_channels": 6, "algo": "norm"]
    static func with(_ object: JSONObject, _ members: JSONObject) -> JSONValue {
        var result = object
        for (key, value) in members.members { result[key] = value }
        return .object(result)
    }

    @Test("network.create with a bad norm layer: exact code, message and path; the server keeps serving", arguments: [
        Problem(label: "a linear member on a layer_norm", layer: with(layerNorm, ["in_features": 4]), code: -32602,
                message: "Invalid params: layers[0].in_features is not a member of a layer_norm layer (members: algo, bias, eps, has_bias, kind, name, normalized_shape, options, weight)",
                path: "layers[0].in_features"),
        Problem(label: "normalized_shape on a group_norm", layer: with(groupNorm, ["normalized_shape": [6]]), code: -32602,
                message: "Invalid params: layers[0].normalized_shape is not a member of a group_norm layer (members: algo, bias, eps, has_bias, kind, name, num_channels, num_groups, options, weight)",
                path: "layers[0].normalized_shape"),
        Problem(label: "group_norm without num_channels", layer: ["name": "gn", "kind": "group_norm", "num_groups": 2], code: -32602,
                message: "Invalid params: missing layers[0].num_channels", path: "layers[0].num_channels"),
        Problem(label: "normalized_shape a string", layer: with(layerNorm, ["normalized_shape": "4"]), code: -32602,
                message: "Invalid params: layers[0].normalized_shape must be an integer or an array of integers", path: "layers[0].normalized_shape"),
        Problem(label: "eps a string", layer: with(layerNorm, ["eps": "small"]), code: -32602,
                message: "Invalid params: layers[0].eps must be a number", path: "layers[0].eps"),
        Problem(label: "negative eps", layer: with(layerNorm, ["eps": -1.0]), code: -32602,
                message: "Invalid params: layers[0]: eps must be finite and non-negative, got -1.0", path: "layers[0]"),
        Problem(label: "has_bias a number", layer: with(layerNorm, ["has_bias": 1]), code: -32602,
                message: "Invalid params: layers[0].has_bias must be a boolean, got a number", path: "layers[0].has_bias"),
        Problem(label: "G not dividing C", layer: with(groupNorm, ["num_groups": 4]), code: -32602,
                message: "Invalid params: layers[0]: num_groups 4 must divide num_channels 6", path: "layers[0]"),
        Problem(label: "a zero extent", layer: with(layerNorm, ["normalized_shape": [4, 0]]), code: -32602,
                message: "Invalid params: layers[0]: normalized_shape must be a non-empty list of positive extents, got [4, 0]", path: "layers[0]"),
        Problem(label: "a bias with has_bias false", layer: with(layerNorm, ["has_bias": false, "bias": Wire.tensor(.zeros([4]))]), code: -32602,
                message: "Invalid params: layers[0].bias is given for a layer with has_bias false", path: "layers[0].bias"),
        Problem(label: "a weight of the wrong shape", layer: with(groupNorm, ["weight": Wire.tensor(.zeros([2, 3]))]), code: -32002,
                message: "Shape mismatch: layers[0].weight has shape [2, 3], the layer needs [6]", path: "layers[0].weight"),
        Problem(label: "lora on a group_norm", layer: with(groupNorm, ["algo": "lora"]), code: -32008,
                message: "Adapter error: gn: locon cannot adapt a group_norm layer (only norm adapts layer_norm and group_norm layers)", path: "layers[0]"),
        Problem(label: "loha on a layer_norm", layer: with(layerNorm, ["algo": "loha"]), code: -32008,
                message: "Adapter error: ln: loha cannot adapt a layer_norm layer (only norm adapts layer_norm and group_norm layers)", path: "layers[0]"),
        Problem(label: "norm on a linear layer", layer: ["name": "lin", "kind": "linear", "in_features": 4, "out_features": 4, "algo": "norm"], code: -32008,
                message: "Adapter error: lin: norm adapts only layer_norm and group_norm layers", path: "layers[0]"),
        Problem(label: "the old kind \"norm\"", layer: with(layerNorm, ["kind": "norm"]), code: -32602,
                message: "Invalid params: layers[0].kind must be linear, conv1d, conv2d, conv3d, layer_norm or group_norm, got \"norm\"", path: "layers[0].kind"),
    ])
    func createProblem(_ problem: Problem) throws {
        let harness = try ServerHarness()
        let error = try harness.error("network.create", ["layers": [problem.layer]])
        #expect(error.code == problem.code && error.message == problem.message, "\(error)")
        #expect(error.data == ["path": .string(problem.path)], "\(error)")
        try harness.expectServesWithoutNetwork()
        let oracle = try OracleNetwork.createNorms(in: harness)
        try harness.expectServes(oracle, module: "gn")
    }

    @Test("grad_bias for a module without a bias delta, or of the wrong shape: -32002 naming the path; nothing consumed")
    func gradBiasProblems() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        let result = try harness.result("delta_weight", ["modules": ["lin", "ln_nobias", "gn", "gn"], "grad": true])
        let tapes = try #require(result["results"]?.arrayValue).map { try #require($0["tape"]) }
        let cases: [(JSONValue, String)] = [
            (["tape": tapes[0], "grad": Wire.tensor(.zeros([24, 16])), "grad_bias": Wire.tensor(.zeros([24]))],
             "Shape mismatch: calls[1].grad_bias is given, but module lin has no bias delta (only norm modules on layers with a bias have one)"),
            (["tape": tapes[1], "grad": Wire.tensor(.zeros([8])), "grad_bias": Wire.tensor(.zeros([8]))],
             "Shape mismatch: calls[1].grad_bias is given, but module ln_nobias has no bias delta (only norm modules on layers with a bias have one)"),
            (["tape": tapes[3], "grad": Wire.tensor(.zeros([6])), "grad_bias": Wire.tensor(.zeros([2, 3]))],
             "Shape mismatch: calls[1].grad_bias has shape [2, 3], expected [6]"),
        ]
        let valid: JSONValue = ["tape": tapes[2], "grad": Wire.tensor(.zeros([6]))]
        for (call, message) in cases {
            // The bad call second: the valid first call must not be consumed either.
            let error = try harness.error("delta_weight_backward", ["calls": [valid, call]])
            #expect(error.code == -32002 && error.message == message, "\(error)")
            #expect(error.data == ["path": "calls[1].grad_bias"])
        }
        #expect(try harness.result("network.info")["pending_tapes"] == 4)
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 })
        try harness.expectServes(oracle, module: "ln")
    }

    @Test("network.load of a LoRA file onto norm layers: -32008 naming the module, nothing replaced")
    func loadLoRAOntoNorm() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.createNorms(in: harness)
        let other = try ServerHarness()
        try other.result("network.create", ["layers": [["name": "gn", "kind": "linear", "in_features": 6, "out_features": 6]]])
        let path = harness.path("lora.safetensors")
        try other.result("network.save", ["path": .string(path)])
        let error = try harness.error("network.load", ["path": .string(path)])
        #expect(error.code == -32008)
        #expect(error.message == "Adapter error: gn: locon cannot adapt a group_norm layer (only norm adapts layer_norm and group_norm layers)")
        try harness.expectServes(oracle, module: "gn")
    }
}
