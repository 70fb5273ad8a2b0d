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

/// The layers of the behaviour tests: the standard linear and 3×3 conv, plus a strided,
/// padded conv.
let behaviourLayers: [TestLayer] = standardLayers + [.conv("strided", in: 4, out: 6, kernel: 3, padding: 1, stride: 2, seed: 300)]

/// conv1d and conv3d layers: a strided, padded k=3 conv1d, a k=1 conv1d and a padded
/// 3×3×3 conv3d.
let convNdLayers: [TestLayer] = [
    .conv("seq", in: 8, out: 12, kernel: 3, padding: 1, stride: 2, axes: 1, seed: 400),
    .conv("seq_pointwise", in: 8, out: 6, kernel: 1, axes: 1, seed: 410),
    .conv("volume", in: 4, out: 6, kernel: 3, padding: 1, axes: 3, seed: 420),
]

/// The layer sets the compute and file behaviour tests run on.
struct LayerSet: Sendable, CustomTestStringConvertible {
    let label: String
    let layers: [TestLayer]
    var testDescription: String { label }
}

let layerSets = [LayerSet(label: "linear, conv2d", layers: behaviourLayers), LayerSet(label: "conv1d, conv3d", layers: convNdLayers)]

/// Every computed algorithm with a few option sets.
let adapterConfigs: [AdapterConfig] = [
    .lora,
    .make("lora tucker+scalar", "lora", ["lora_dim": 3, "alpha": 1.5, "use_tucker": true, "use_scalar": true]) {
        $0.rank = 3; $0.alpha = 1.5; $0.useTucker = true; $0.useScalar = true
    },
    .make("lora rs_lora", "lora", ["lora_dim": 4, "alpha": 4.0, "rs_lora": true]) { $0.rank = 4; $0.alpha = 4; $0.rsLoRA = true },
    .make("lora bypass", "lora", ["lora_dim": 4, "alpha": 2.0, "bypass_mode": true]) { $0.rank = 4; $0.alpha = 2; $0.bypassMode = true },
    .make("locon alpha null", "locon", ["lora_dim": 2, "alpha": nil]) { $0.rank = 2; $0.alpha = nil },
    .make("loha r2", "loha", ["lora_dim": 2, "alpha": 1.0]) { $0.rank = 2; $0.alpha = 1 },
    .make("loha tucker", "loha", ["lora_dim": 2, "alpha": 1.0, "use_tucker": true]) { $0.rank = 2; $0.alpha = 1; $0.useTucker = true },
    .make("lokr factor 2", "lokr", ["lora_dim": 2, "alpha": 1.0, "factor": 2]) { $0.rank = 2; $0.alpha = 1; $0.factor = 2 },
    .make("lokr decompose_both", "lokr", ["lora_dim": 2, "alpha": 1.0, "decompose_both": true]) {
        $0.rank = 2; $0.alpha = 1; $0.decomposeBoth = true
    },
    .make("ia3", "ia3", [:]) { _ in },
    .make("ia3 on input", "ia3", ["train_on_input": true]) { $0.trainOnInput = true },
    .make("dylora r4 block 2", "dylora", ["lora_dim": 4, "alpha": 2.0, "block_size": 2]) { $0.rank = 4; $0.alpha = 2; $0.blockSize = 2 },
    // (Principal singular vectors: a file reloads its frozen term from those, see TLoRATests.)
    .make("tlora r3", "tlora", ["lora_dim": 3, "alpha": 2.0]) { $0.rank = 3; $0.alpha = 2 },
    .make("dora lora", "lora", ["lora_dim": 2, "alpha": 1.0, "weight_decompose": true]) { $0.rank = 2; $0.alpha = 1; $0.weightDecompose = true },
    .make("dora loha on input, bypass", "loha", ["lora_dim": 2, "weight_decompose": true, "wd_on_out": false, "bypass_mode": true]) {
        $0.rank = 2; $0.weightDecompose = true; $0.wdOnOutput = false; $0.bypassMode = true
    },
    .make("dora lokr", "lokr", ["lora_dim": 1, "factor": 2, "weight_decompose": true]) { $0.rank = 1; $0.factor = 2; $0.weightDecompose = true },
    .make("glora scalar", "glora", ["lora_dim": 2, "alpha": 1.0, "use_scalar": true]) { $0.rank = 2; $0.alpha = 1; $0.useScalar = true },
    .make("full", "full", [:]) { _ in },
]

// MARK: - Naive references

/// op(x, W) + b by loops: linear over the last axis, a direct conv1d/conv2d/conv3d
/// (groups 1), or a norm.
func naiveLayer(_ spec: LayerSpec, _ x: Tensor, weight: Tensor, bias: Tensor) -> Tensor {
    switch spec {
    case let .linear(inFeatures, outFeatures):
        let rows = x.count / inFeatures
        var y = [Float](repeating: 0, count: rows * outFeatures)
        for r in 0..<rows {
            for o in 0..<outFeatures {
                var sum = Double(bias.scalars[o])
                for i in 0..<inFeatures { sum += Double(x.scalars[r * inFeatures + i]) * Double(weight.scalars[o * inFeatures + i]) }
                y[r * outFeatures + o] = Float(sum)
            }
        }
        return Tensor(shape: Array(x.shape.dropLast()) + [outFeatures], scalars: y)
    case let .convolution(g):
        // Every spatial rank as (depth, height, width), missing leading axes of extent 1.
        precondition(g.groups == 1)
        let lead = 3 - g.spatialRank
        func padded(_ values: [Int], _ fill: Int) -> [Int] { [Int](repeating: fill, count: lead) + values }
        let (size, k) = (padded(Array(x.shape[2...]), 1), padded(g.kernelSize, 1))
        let (s, p, d) = (padded(g.stride, 1), padded(g.padding, 0), padded(g.dilation, 1))
        let out: [Int] = (0..<3).map { axis -> Int in
            let span: Int = size[axis] + 2 * p[axis] - d[axis] * (k[axis] - 1) - 1
            return span / s[axis] + 1
        }
        let (n, c) = (x.shape[0], x.shape[1])
        var y = [Float](repeating: 0, count: n * g.outChannels * out.reduce(1, *))
        for b in 0..<n {
            for o in 0..<g.outChannels {
                for oz in 0..<out[0] {
                    for oy in 0..<out[1] {
                        for ox in 0..<out[2] {
                            var sum = Double(bias.scalars[o])
                            for ch in 0..<c {
                                for t in 0..<k[0] {
                                    for u in 0..<k[1] {
                                        for v in 0..<k[2] {
                                            let iz: Int = oz * s[0] - p[0] + t * d[0]
                                            let iy: Int = oy * s[1] - p[1] + u * d[1]
                                            let ix: Int = ox * s[2] - p[2] + v * d[2]
                                            guard iz >= 0, iz < size[0], iy >= 0, iy < size[1], ix >= 0, ix < size[2] else { continue }
                                            let xi: Int = (((b * c + ch) * size[0] + iz) * size[1] + iy) * size[2] + ix
                                            let wi: Int = (((o * c + ch) * k[0] + t) * k[1] + u) * k[2] + v
                                            sum += Double(x.scalars[xi]) * Double(weight.scalars[wi])
                                        }
                                    }
                                }
                            }
                            let index: Int = (((b * g.outChannels + o) * out[0] + oz) * out[1] + oy) * out[2] + ox
                            y[index] = Float(sum)
                        }
                    }
                }
            }
        }
        return Tensor(shape: [n, g.outChannels] + out.suffix(g.spatialRank), scalars: y)
    case let .norm(normalization):
        return naiveNorm(normalization, x, weight: weight, bias: bias)
    }
}

/// x̂·W + b by loops: layer norm over the trailing normalized_shape; group norm per (n, group)
/// over its channels × spatial positions, with W and b per channel.
func naiveNorm(_ normalization: Normalization, _ x: Tensor, weight: Tensor, bias: Tensor) -> Tensor {
    // Each normalised set as (sample, channel range, positions per channel), and the weight index.
    var sets: [[Int]] = []
    let channelOf: (Int) -> Int
    switch normalization.kind {
    case let .layer(normalizedShape):
        let size = normalizedShape.reduce(1, *)
        sets = (0..<(x.count / size)).map { row in Array((row * size)..<((row + 1) * size)) }
        channelOf = { $0 % size }
    case let .group(groups, channels):
        let spatial = x.shape[2...].reduce(1, *)
        let perGroup = channels / groups
        for sample in 0..<x.shape[0] {
            for group in 0..<groups {
                var members: [Int] = []
                for channel in (group * perGroup)..<((group + 1) * perGroup) {
                    for position in 0..<spatial { members.append((sample * channels + channel) * spatial + position) }
                }
                sets.append(members)
            }
        }
        channelOf = { ($0 / spatial) % channels }
    }
    var y = [Float](repeating: 0, count: x.count)
    for members in sets {
        let mean = members.reduce(0.0) { $0 + Double(x.scalars[$1]) } / Double(members.count)
        let variance = members.reduce(0.0) { $0 + (Double(x.scalars[$1]) - mean) * (Double(x.scalars[$1]) - mean) } / Double(members.count)
        for i in members {
            let normalized = (Double(x.scalars[i]) - mean) / (variance + normalization.eps).squareRoot()
            y[i] = Float(normalized * Double(weight.scalars[channelOf(i)]) + Double(bias.scalars[channelOf(i)]))
        }
    }
    return Tensor(shape: x.shape, scalars: y)
}

/// The product A·B of 2-D tensors by loops.
func naiveMatmul(_ a: Tensor, _ b: Tensor) -> Tensor {
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1])
    precondition(b.shape[0] == k)
    var c = [Float](repeating: 0, count: m * n)
    for i in 0..<m {
        for j in 0..<n {
            var sum = 0.0
            for p in 0..<k { sum += Double(a.scalars[i * k + p]) * Double(b.scalars[p * n + j]) }
            c[i * n + j] = Float(sum)
        }
    }
    return Tensor(shape: [m, n], scalars: c)
}

// MARK: - Compute

@Suite("server behaviour: compute")
struct ComputeBehaviourTests {
    @Test("forward equals the library's forwardDelta with the same parameters", arguments: adapterConfigs, layerSets)
    func forwardMatchesLibrary(_ config: AdapterConfig, _ layerSet: LayerSet) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: layerSet.layers)
        let info = try harness.result("network.info")
        for (index, layer) in layerSet.layers.enumerated() {
            let module = oracle[layer.name]
            let listed = try #require(info["modules"]?[index])
            #expect(listed["name"] == .string(layer.name))
            #expect(listed["algorithm"] == .string(type(of: module.algorithm).algorithm.rawValue))
            #expect(listed["rank"]?.intValue == module.algorithm.rank)
            #expect(listed["scale"]?.doubleValue.map(Float.init) == module.algorithm.scale)
            if case let .convolution(g) = layer.spec {
                // Every geometry member, as arrays of the layer's spatial rank.
                let reported = try #require(listed["layer"])
                #expect(reported["kind"] == .string(["conv1d", "conv2d", "conv3d"][g.spatialRank - 1]))
                #expect(reported["in_channels"]?.intValue == g.inChannels && reported["out_channels"]?.intValue == g.outChannels)
                for (key, value) in [("kernel_size", g.kernelSize), ("stride", g.stride), ("padding", g.padding), ("dilation", g.dilation)] {
                    #expect(reported[key]?.arrayValue?.compactMap(\.intValue) == value, "\(layer.name) \(key)")
                    #expect(value.count == g.spatialRank)
                }
                #expect(reported["groups"]?.intValue == g.groups)
            }
            let x = randomTensor(layer.inputShape, seed: 50 + UInt64(index))
            let y = try harness.forward(layer.name, x)
            expectClose(y, try oracle.delta(layer.name, x), "\(config.label) \(layer.name)")
        }
        let expectedCount = oracle.modules.values.reduce(0) { $0 + $1.algorithm.parameterCount }
        #expect(info["parameter_count"]?.intValue == expectedCount)
    }

    @Test("LoRA: the server's ΔW is scale·up·down and its forward is op(x, ΔW), by loops")
    func loraByHand() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.create(in: harness)
        let p = try harness.parameters()
        let up = try #require(p["lin.lora_up.weight"]), down = try #require(p["lin.lora_down.weight"])
        let expectedDelta = naiveMatmul(up, down) * 0.5  // α/r = 2/4
        let result = try harness.result("delta_weight", ["modules": ["lin"]])
        let delta = try Wire.decode(result["results"]?[0]?["delta_weight"])
        expectClose(delta, expectedDelta, "ΔW of lin")
        let x = randomTensor([2, 3, 16], seed: 3)
        let y = try harness.forward("lin", x)
        expectClose(y, naiveLayer(standardLayers[0].spec, x, weight: expectedDelta, bias: .zeros([24])), "Δ(x) of lin")
        // The conv: up (12, 4, 1, 1) · down (4, 8·3·3), reshaped to the kernel.
        let cu = try #require(p["conv.lora_up.weight"]), cd = try #require(p["conv.lora_down.weight"])
        let convDelta = (naiveMatmul(cu.reshaped([12, 4]), cd.reshaped([4, 72])) * 0.5).reshaped([12, 8, 3, 3])
        let cx = randomTensor([2, 8, 5, 6], seed: 4)
        expectClose(try harness.forward("conv", cx), naiveLayer(standardLayers[1].spec, cx, weight: convDelta, bias: .zeros([12])), "Δ(x) of conv")
    }

    @Test("\"full\": true equals op(x, W) + b + Δ(x), the base computed by loops", arguments: [AdapterConfig.lora, adapterConfigs[5], adapterConfigs[9]])
    func fullOutput(_ config: AdapterConfig) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: behaviourLayers)
        for layer in behaviourLayers {
            let x = randomTensor(layer.inputShape, seed: 77)
            let y = try harness.forward(layer.name, x, extra: ["full": true])
            let expected = naiveLayer(layer.spec, x, weight: layer.weight, bias: layer.bias) + (try oracle.delta(layer.name, x))
            expectClose(y, expected, tolerance: 1e-5, "\(config.label) full \(layer.name)")
        }
    }

    @Test("\"full\" without a base weight: -32007 naming the layer")
    func fullWithoutWeight() throws {
        let harness = try ServerHarness()
        try harness.result("network.create", ["layers": [standardLayers[0].json(weight: false)]])
        let error = try harness.error("forward", ["calls": [["module": "lin", "input": Wire.tensor(randomTensor([1, 16], seed: 1)), "full": true]]])
        expectError(error, code: -32007, "lin has no base weight")
    }

    @Test("backward's grad_input and parameter grads equal the library's backwardDelta", arguments: adapterConfigs, layerSets)
    func backwardMatchesLibrary(_ config: AdapterConfig, _ layerSet: LayerSet) throws {
        let harness = try ServerHarness()
        let behaviourLayers = layerSet.layers
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: behaviourLayers)
        // One batch of forwards (one per layer), then one batch of backwards.
        let inputs = behaviourLayers.enumerated().map { randomTensor($1.inputShape, seed: 500 + UInt64($0)) }
        let forward = try harness.result("forward", ["grad": true, "calls": .array(zip(behaviourLayers, inputs).map { layer, x in
            ["module": .string(layer.name), "input": Wire.tensor(x)]
        })])
        let tapes = try #require(forward["results"]?.arrayValue).map { try #require($0["tape"]?.intValue) }
        #expect(Set(tapes).count == behaviourLayers.count)
        var gradOutputs: [Tensor] = []
        for (index, layer) in behaviourLayers.enumerated() {
            gradOutputs.append(randomTensor(layer.spec.outputShape(forInput: inputs[index].shape), seed: 600 + UInt64(index)))
        }
        let backward = try harness.result("backward", ["return_parameter_grads": true, "calls": .array(tapes.indices.map {
            ["tape": JSONValue(tapes[$0]), "grad_output": Wire.tensor(gradOutputs[$0])]
        })])
        let results = try #require(backward["results"]?.arrayValue)
        try #require(results.count == behaviourLayers.count)
        for (index, layer) in behaviourLayers.enumerated() {
            let expected = try oracle.backward(layer.name, inputs[index], gradOutputs[index])
            expectClose(try Wire.decode(results[index]["grad_input"]), expected.input, "\(config.label) grad_input \(layer.name)")
            let grads = try #require(results[index]["parameter_grads"]?.objectValue)
            #expect(Set(grads.keys) == Set(expected.parameters.keys))
            for (key, tensor) in expected.parameters {
                expectClose(try Wire.decode(grads[key]), tensor, tolerance: 1e-5, "\(config.label) \(key)")
            }
        }
    }

    @Test("backward of a \"full\" forward adds W0ᵀ·g to grad_input")
    func fullBackward() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, layers: behaviourLayers)
        for layer in behaviourLayers {
            let x = randomTensor(layer.inputShape, seed: 8)
            let (_, tape) = try harness.forwardTape(layer.name, x, extra: ["full": true])
            let g = randomTensor(layer.spec.outputShape(forInput: x.shape), seed: 9)
            let (gradInput, grads) = try harness.backward(tape: tape, g)
            var unused = RandomSource(seed: 0)
            let module = oracle[layer.name]
            let expected = try module.backward(x, gradOutput: g, tape: module.makeTape(inputShape: x.shape, random: &unused))
            expectClose(gradInput, expected.input, "full grad_input \(layer.name)")
            // The base part alone, by loops, for the linear layer: g·W0.
            if case .linear = layer.spec {
                let baseOnly = naiveMatmul(g.reshaped([6, 24]), layer.weight).reshaped(x.shape)
                let adapterPart = try oracle.backward(layer.name, x, g).input
                expectClose(gradInput, baseOnly + adapterPart, "g·W0 + adapter grad")
            }
            for (name, tensor) in expected.parameters.entries {
                expectClose(try #require(grads["\(layer.name).\(name)"]), tensor, "full \(layer.name).\(name)")
            }
        }
    }

    @Test("gradients accumulate over backward calls; accumulate: false leaves them alone; gradients.zero clears")
    func gradientAccumulation() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness)
        let x1 = randomTensor([2, 3, 16], seed: 1), x2 = randomTensor([4, 16], seed: 2)
        let g1 = randomTensor([2, 3, 24], seed: 3), g2 = randomTensor([4, 24], seed: 4)
        let (_, t1) = try harness.forwardTape("lin", x1)
        let (_, t2) = try harness.forwardTape("lin", x2)
        _ = try harness.backward(tape: t1, g1)
        let afterOne = try harness.parameters(["lin.lora_up.weight", "lin.lora_down.weight"], gradients: true)
        let e1 = try oracle.backward("lin", x1, g1).parameters
        for (key, tensor) in e1 { expectClose(try #require(afterOne[key]), tensor, "after one backward: \(key)") }
        _ = try harness.backward(tape: t2, g2)
        let e2 = try oracle.backward("lin", x2, g2).parameters
        let summed = try harness.parameters(gradients: true)
        for (key, tensor) in e1 { expectClose(try #require(summed[key]), tensor + e2[key]!, "sum of two: \(key)") }
        // The conv had no backward: its gradients are zeros of the right shapes.
        #expect(summed["conv.lora_up.weight"] == .zeros([12, 4, 1, 1]))
        #expect(summed["conv.lora_down.weight"] == .zeros([4, 8, 3, 3]))
        // accumulate: false returns the grads but does not add them.
        let (_, t3) = try harness.forwardTape("lin", x1)
        let (_, returned) = try harness.backward(tape: t3, g1, accumulate: false)
        for (key, tensor) in e1 { expectClose(try #require(returned[key]), tensor, "returned with accumulate false: \(key)") }
        #expect(try harness.parameters(gradients: true) == summed)
        try harness.result("gradients.zero")
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 })
    }

    @Test("delta_weight and delta_weight_backward equal the library's effectiveDeltaWeight and its backward", arguments: adapterConfigs, layerSets)
    func deltaWeight(_ config: AdapterConfig, _ layerSet: LayerSet) throws {
        let harness = try ServerHarness()
        let behaviourLayers = layerSet.layers
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: behaviourLayers)
        let result = try harness.result("delta_weight", ["grad": true, "dtype": "F32"])
        let results = try #require(result["results"]?.arrayValue)
        #expect(results.compactMap { $0["module"]?.stringValue } == behaviourLayers.map(\.name))
        var calls: [JSONValue] = []
        var gradients: [String: Tensor] = [:]
        for (index, layer) in behaviourLayers.enumerated() {
            let module = oracle[layer.name]
            var unused = RandomSource(seed: 0)
            let tape = module.makeTape(inputShape: [], random: &unused)
            let expected = try module.effectiveDeltaWeight(tape)
            expectClose(try Wire.decode(results[index]["delta_weight"]), expected, "\(config.label) ΔW \(layer.name)")
            let g = randomTensor(layer.spec.weightShape, seed: 900 + UInt64(index))
            gradients[layer.name] = g
            calls.append(["tape": try #require(results[index]["tape"]), "grad": Wire.tensor(g)])
        }
        let backward = try harness.result("delta_weight_backward", ["calls": .array(calls), "return_parameter_grads": true])
        let backResults = try #require(backward["results"]?.arrayValue)
        let accumulated = try harness.parameters(gradients: true)
        for (index, layer) in behaviourLayers.enumerated() {
            let module = oracle[layer.name]
            var unused = RandomSource(seed: 0)
            let expected = try module.effectiveDeltaWeightBackward(gradients[layer.name]!, module.makeTape(inputShape: [], random: &unused))
            #expect(backResults[index]["grad_input"] == nil)
            let grads = try #require(backResults[index]["parameter_grads"]?.objectValue)
            for (name, tensor) in expected.entries {
                let key = "\(layer.name).\(name)"
                expectClose(try Wire.decode(grads[key]), tensor, "\(config.label) \(key)")
                expectClose(try #require(accumulated[key]), tensor, "accumulated \(key)")
            }
        }
        // Consistency: Δ(x) = op(x, ΔW) (+ Δb: full) for the rebuild path.
        let first = behaviourLayers[0]
        let x = randomTensor(first.inputShape, seed: 5)
        let dw = try Wire.decode(results[0]["delta_weight"])
        var unused = RandomSource(seed: 0)
        let firstModule = oracle[first.name]
        let db = try firstModule.effectiveDeltaBias(firstModule.makeTape(inputShape: [], random: &unused)) ?? .zeros([first.spec.outFeatures])
        expectClose(try harness.forward(first.name, x), naiveLayer(first.spec, x, weight: dw, bias: db), "op(x, ΔW)")
    }

    @Test("network.set_timestep_mask: T-LoRA's ΔW with the mask equals the library's; null restores every rank; bad masks are -32602")
    func timestepMask() throws {
        let harness = try ServerHarness()
        let config = AdapterConfig.make("tlora r3", "tlora", ["lora_dim": 3, "alpha": 1.5]) { $0.rank = 3; $0.alpha = 1.5 }
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: behaviourLayers)
        func serverDeltas() throws -> [Tensor] {
            let results = try #require(try harness.result("delta_weight", ["dtype": "F32"])["results"]?.arrayValue)
            return try results.map { try Wire.decode($0["delta_weight"]) }
        }
        func libraryDeltas(_ mask: [Float]?) throws -> [Tensor] {
            try behaviourLayers.map { layer in
                var module = oracle[layer.name]
                module.timestepMask = mask.map { Tensor(shape: [$0.count], scalars: $0) }
                var unused = RandomSource(seed: 0)
                return try module.effectiveDeltaWeight(module.makeTape(inputShape: [], random: &unused))
            }
        }
        let unmasked = try serverDeltas()
        try harness.result("network.set_timestep_mask", ["mask": [1, 0]])
        let masked = try serverDeltas()
        for (index, expected) in try libraryDeltas([1, 0]).enumerated() {
            expectClose(masked[index], expected, "masked ΔW \(index)")
            #expect(relativeError(masked[index], unmasked[index]) > 0.05, "the mask changes ΔW")
        }
        try harness.result("network.set_timestep_mask", ["mask": nil])
        for (index, expected) in try libraryDeltas(nil).enumerated() { expectClose(try serverDeltas()[index], expected, "unmasked ΔW \(index)") }
        for bad: JSONValue in [[], ["x"], 3] {
            expectError(try harness.error("network.set_timestep_mask", ["mask": bad]), code: -32602, "mask")
        }
    }

    @Test("conv_dim and conv_alpha apply to k×k convolutions only; conv_dim 0 skips them")
    func convDim() throws {
        let harness = try ServerHarness()
        let info = try harness.result("network.create", [
            "options": ["lora_dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0],
            "layers": .array(behaviourLayers.map { $0.json() } + [TestLayer.conv("pointwise", in: 12, out: 12, kernel: 1, seed: 5).json()]),
        ])
        let modules = try #require(info["modules"]?.arrayValue)
        #expect(modules.map { $0["rank"]?.intValue } == [4, 2, 2, 4])
        #expect(modules.map { $0["scale"]?.doubleValue } == [0.5, 0.5, 0.5, 0.5])
        #expect(info["skipped_layers"] == [])
        let skipping = try ServerHarness()
        let skipped = try skipping.result("network.create", [
            "options": ["conv_dim": 0], "layers": .array(behaviourLayers.map { $0.json() }),
        ])
        #expect(skipped["skipped_layers"] == ["conv", "strided"])
        #expect(skipped["modules"]?.arrayValue?.compactMap { $0["name"]?.stringValue } == ["lin"])
    }

    /// LyCORIS (`k_size, *_ = module.kernel_size; if k_size == 1`) looks at the kernel's
    /// first extent only.
    @Test("conv_dim and conv_alpha follow LyCORIS on conv1d, conv2d and conv3d: only the kernel's first extent counts")
    func convDimFirstExtent() throws {
        func layer(_ name: String, _ kind: String, _ kernel: [Int]) -> JSONValue {
            ["name": .string(name), "kind": .string(kind), "in_channels": 4, "out_channels": 4, "kernel_size": JSONValue(kernel)]
        }
        let harness = try ServerHarness()
        let info = try harness.result("network.create", [
            "options": ["lora_dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 2.0],
            "layers": [layer("c1_k3", "conv1d", [3]), layer("c1_k1", "conv1d", [1]), layer("c2_1x3", "conv2d", [1, 3]),
                       layer("c2_3x1", "conv2d", [3, 1]), layer("c3_1x3x3", "conv3d", [1, 3, 3]), layer("c3_3x1x1", "conv3d", [3, 1, 1])],
        ])
        let modules = try #require(info["modules"]?.arrayValue)
        #expect(modules.map { $0["rank"]?.intValue } == [2, 4, 4, 2, 4, 2])
        #expect(modules.map { $0["scale"]?.doubleValue } == [1, 0.5, 0.5, 1, 0.5, 1])
    }

    @Test("factor_path and factor_multiply_adds: true (and the count) where Δ(x) has a cheaper factor path (LoRA on a wide layer, LoHa at low rank, LoKr), false for norm, grouped and rank-heavy LoRA and LoHa")
    func factorPath() throws {
        let harness = try ServerHarness()
        let linear: JSONValue = ["kind": "linear", "in_features": 64, "out_features": 64]
        func named(_ name: String, _ layer: JSONValue, _ extra: [String: JSONValue] = [:]) -> JSONValue {
            var object = layer.objectValue ?? [:]
            object["name"] = .string(name)
            for (key, value) in extra { object[key] = value }
            return .object(object)
        }
        let info = try harness.result("network.create", [
            "options": ["lora_dim": 4],
            "layers": [
                named("lora", linear),
                // r·(in + out) = 8·(8 + 8) ≥ out·in = 64: the factors cost more than op(x, ΔW).
                named("lora_rank_heavy", ["kind": "linear", "in_features": 8, "out_features": 8], ["options": ["lora_dim": 8]]),
                named("lora_grouped", ["kind": "conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 2]),
                // LoHa's rank-r² chain: 16·(64 + 64) < 64·64, but 64·(64 + 64) is not.
                named("loha", linear, ["algo": "loha"]),
                named("loha_rank_heavy", linear, ["algo": "loha", "options": ["lora_dim": 8]]),
                named("lokr", linear, ["algo": "lokr"]),
                named("norm", ["kind": "layer_norm", "normalized_shape": 8], ["algo": "norm"]),
            ],
        ])
        let modules = try #require(info["modules"]?.arrayValue)
        #expect(modules.map { $0["factor_path"]?.boolValue } == [true, false, false, true, false, true, false])
        // factor_multiply_adds per position: LoRA r·in + out·r = 512; LoHa r²·(in + out) =
        // 2048; LoKr 8×8 ⊗ 8×8: in_m·out_k·in_n + out_l·in_m·out_k = 512 + 512; null where
        // factor_path is false.
        #expect(modules.map { $0["factor_multiply_adds"]?.intValue } == [512, nil, nil, 2048, nil, 1024, nil])
        #expect(modules.allSatisfy { $0.objectValue?.keys.contains("factor_multiply_adds") == true })
    }

    @Test("network.create's seed reproduces LyCORIS's initialisation from the library, layer by layer")
    func creationSeed() throws {
        let harness = try ServerHarness()
        try harness.result("network.create", ["seed": 1234, "algo": "loha", "options": ["lora_dim": 2],
                                              "layers": .array(behaviourLayers.map { $0.json() })])
        var random = RandomSource(seed: 1234)
        var options = AdapterOptions()
        options.rank = 2
        let parameters = try harness.parameters()
        for layer in behaviourLayers {
            let adapter = try Algorithm.loha.makeAdapter(layer: layer.spec, options: options, random: &random)
            for (name, tensor) in adapter.parameters.entries {
                #expect(parameters["\(layer.name).\(name)"] == tensor, "\(layer.name).\(name)")
            }
        }
        #expect(parameters.count == 3 * 4)
    }

    @Test("set_multiplier scales Δ linearly (0 gives zeros), network.create's multiplier too")
    func multiplier() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, layers: behaviourLayers)
        let x = randomTensor([2, 3, 16], seed: 3)
        let base = try oracle.delta("lin", x)
        for m: Float in [0.5, -2, 3.25] {
            try harness.result("network.set_multiplier", ["multiplier": JSONValue(m)])
            expectClose(try harness.forward("lin", x), base * m, "multiplier \(m)")
            let info = try harness.result("network.info")
            #expect(info["modules"]?.arrayValue?.allSatisfy { $0["multiplier"]?.doubleValue == Double(m) } == true)
        }
        try harness.result("network.set_multiplier", ["multiplier": 0])
        #expect(try harness.forward("lin", x).maxAbs == 0)
        // Backward scales with the multiplier too.
        try harness.result("network.set_multiplier", ["multiplier": 2])
        let (_, tape) = try harness.forwardTape("lin", x)
        let g = randomTensor([2, 3, 24], seed: 4)
        let (gradInput, grads) = try harness.backward(tape: tape, g)
        let unscaled = try oracle.backward("lin", x, g)
        expectClose(gradInput, unscaled.input * 2, "grad_input at multiplier 2")
        for (key, tensor) in unscaled.parameters { expectClose(try #require(grads[key]), tensor * 2, "\(key) at multiplier 2") }

        let created = try ServerHarness()
        let info = try created.result("network.create", ["multiplier": 0.25, "layers": [standardLayers[0].json()]])
        #expect(info["modules"]?[0]?["multiplier"]?.doubleValue == 0.25)
    }
}

// MARK: - Training mode, dropout and seeds

@Suite("server behaviour: training mode")
struct TrainingBehaviourTests {
    static let dropoutConfigs: [AdapterConfig] = [
        .make("lora rank_dropout", "lora", ["lora_dim": 4, "alpha": 2.0, "rank_dropout": 0.5]) { $0.rank = 4; $0.alpha = 2; $0.rankDropout = 0.5 },
        .make("lora bypass dropout", "lora", ["lora_dim": 4, "alpha": 2.0, "dropout": 0.3, "bypass_mode": true]) {
            $0.rank = 4; $0.alpha = 2; $0.dropout = 0.3; $0.bypassMode = true
        },
        .make("loha module_dropout", "loha", ["lora_dim": 2, "module_dropout": 0.5]) { $0.rank = 2; $0.moduleDropout = 0.5 },
        .make("lokr rank_dropout scaled", "lokr", ["lora_dim": 2, "factor": 2, "rank_dropout": 0.4, "rank_dropout_scale": true]) {
            $0.rank = 2; $0.factor = 2; $0.rankDropout = 0.4; $0.rankDropoutScale = true
        },
    ]

    @Test("training mode with dropout changes outputs; eval mode restores determinism", arguments: dropoutConfigs)
    func trainingChangesOutputs(_ config: AdapterConfig) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, config: config)
        let x = randomTensor([2, 3, 16], seed: 1)
        let eval = try oracle.delta("lin", x)
        expectClose(try harness.forward("lin", x), eval, "eval before training")
        try harness.result("network.set_training", ["training": true])
        #expect(try harness.result("network.info")["training"] == true)
        var outputs: [Tensor] = []
        for _ in 0..<8 { outputs.append(try harness.forward("lin", x)) }
        #expect(Set(outputs.map(\.scalars)).count > 1, "eight training forwards were identical")
        #expect(outputs.contains { relativeError($0, eval) > 1e-3 }, "training never differed from eval")
        try harness.result("network.set_training", ["training": false])
        #expect(try harness.result("network.info")["training"] == false)
        for _ in 0..<3 { expectClose(try harness.forward("lin", x), eval, "eval after training") }
    }

    @Test("network.seed makes training-mode dropout reproducible and equal to the library's draws", arguments: dropoutConfigs)
    func seededDropout(_ config: AdapterConfig) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness, config: config)
        try harness.result("network.set_training", ["training": true])
        let x = randomTensor([2, 3, 16], seed: 1)
        let cx = randomTensor([2, 8, 5, 6], seed: 2)
        func run() throws -> JSONValue {
            try harness.result("forward", ["calls": [["module": "lin", "input": Wire.tensor(x)], ["module": "conv", "input": Wire.tensor(cx)]]])
        }
        for seed in [3, 99] {
            try harness.result("network.seed", ["seed": JSONValue(seed)])
            let first = try run()
            try harness.result("network.seed", ["seed": JSONValue(seed)])
            let second = try run()
            for i in 0..<2 {
                #expect(try Wire.decode(first["results"]?[i]?["output"]) == Wire.decode(second["results"]?[i]?["output"]), "seed \(seed) call \(i)")
            }
            // The library with the same seed draws the same masks, call after call.
            var random = RandomSource(seed: UInt64(seed))
            for (i, (name, input)) in [("lin", x), ("conv", cx)].enumerated() {
                var module = oracle[name]
                module.isTraining = true
                let tape = module.makeTape(inputShape: input.shape, random: &random)
                let expected = try module.forwardDelta(input, tape: tape)
                let actual = try Wire.decode(first["results"]?[i]?["output"])
                if expected.maxAbs == 0 {
                    #expect(actual.maxAbs == 0, "\(config.label) \(name): skipped module must give zeros")
                } else {
                    expectClose(actual, expected, "\(config.label) seeded \(name)")
                }
            }
        }
    }

    @Test("backward replays the forward's dropout masks")
    func backwardReplaysMasks() throws {
        let harness = try ServerHarness()
        let config = TrainingBehaviourTests.dropoutConfigs[1]
        let oracle = try OracleNetwork.create(in: harness, config: config)
        try harness.result("network.set_training", ["training": true])
        try harness.result("network.seed", ["seed": 5])
        let x = randomTensor([2, 3, 16], seed: 1)
        let forward = try harness.result("forward", ["calls": [["module": "lin", "input": Wire.tensor(x)]]])
        let tape = try #require(forward["results"]?[0]?["tape"]?.intValue, "training mode keeps tapes by default")
        // Forwards in between draw new masks; the tape keeps its own.
        _ = try harness.forward("lin", x)
        let g = randomTensor([2, 3, 24], seed: 2)
        let (gradInput, grads) = try harness.backward(tape: Int64(tape), g)
        var random = RandomSource(seed: 5)
        var module = oracle["lin"]
        module.isTraining = true
        let recorded = module.makeTape(inputShape: x.shape, random: &random)
        let expected = try module.backwardDelta(x, gradOutput: g, tape: recorded)
        expectClose(gradInput, expected.input, "grad_input with the forward's masks")
        for (name, tensor) in expected.parameters.entries { expectClose(try #require(grads["lin.\(name)"]), tensor, name) }
        // Eval mode keeps no tape unless asked.
        try harness.result("network.set_training", ["training": false])
        let evalForward = try harness.result("forward", ["calls": [["module": "lin", "input": Wire.tensor(x)]]])
        #expect(evalForward["results"]?[0]?["tape"] == nil)
    }
}

// MARK: - Parameters and dtypes

@Suite("server behaviour: parameters")
struct ParameterBehaviourTests {
    @Test("parameters.get/set round trip in F32, F16 and BF16: the wire bytes are encodeFloats' bytes", arguments: [DType.f32, .f16, .bf16])
    func roundTrip(_ dtype: DType) throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.create(in: harness)
        let original = try harness.parameters()
        // Set every parameter from `dtype` bytes.
        var updates = JSONObject()
        var sent: [String: Tensor] = [:]
        for (index, (key, tensor)) in original.sorted(by: { $0.key < $1.key }).enumerated() {
            let value = randomTensor(tensor.shape, seed: 4000 + UInt64(index), std: 0.7)
            updates[key] = Wire.tensor(value, dtype: dtype)
            // What the server holds: the dtype's value, widened exactly.
            let bytes = try encodeFloats(value.scalars, as: dtype)
            sent[key] = Tensor(shape: value.shape, scalars: bytes.withUnsafeBytes { decodeFloats($0, as: dtype) })
        }
        try harness.result("parameters.set", ["parameters": .object(updates)])
        #expect(try harness.parameters() == sent)
        // Reading back in `dtype` gives exactly the bytes encodeFloats makes.
        let result = try harness.result("parameters.get", ["dtype": .string(dtype.rawValue)])
        for (key, tensor) in sent {
            let descriptor = try #require(result["parameters"]?[key])
            #expect(descriptor["dtype"] == .string(dtype.rawValue))
            #expect(descriptor["shape"] == JSONValue(tensor.shape))
            let data = try #require(descriptor["data"]?.stringValue.flatMap { Data(base64Encoded: $0) })
            #expect(Array(data) == (try encodeFloats(tensor.scalars, as: dtype)))
        }
    }

    @Test("F16 and BF16 rounding on the way out: nearest, ties to even (values worked out by hand)")
    func narrowRounding() throws {
        let harness = try ServerHarness()
        try harness.result("network.create", ["algo": "ia3", "layers": [TestLayer.linear("l", in: 4, out: 8, seed: 1).json()]])
        let values: [Float] = [0.1, 1.0 / 3.0, 1 + 0x1p-11, 1 + 3 * 0x1p-11, 1 + 0x1p-8, 1 + 3 * 0x1p-8, -2.5, 0]
        try harness.result("parameters.set", ["parameters": ["l.weight": Wire.tensor(Tensor(shape: [8], scalars: values))]])
        let f16 = try #require(try harness.parameters(dtype: "F16")["l.weight"])
        let bf16 = try #require(try harness.parameters(dtype: "BF16")["l.weight"])
        #expect(f16.scalars == [0.0999755859375, 0.333251953125, 1, 1.001953125, 1.00390625, 1.01171875, -2.5, 0])
        #expect(bf16.scalars == [0.10009765625, 0.333984375, 1, 1, 1, 1.015625, -2.5, 0])
    }

    @Test("parameters.get with keys and outputs; gradients.get of untouched modules is zeros")
    func selectedKeys() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.create(in: harness)
        let all = try harness.parameters()
        #expect(Set(all.keys) == ["lin.lora_down.weight", "lin.lora_up.weight", "conv.lora_down.weight", "conv.lora_up.weight"])
        let some = try harness.parameters(["conv.lora_up.weight"])
        #expect(some == ["conv.lora_up.weight": all["conv.lora_up.weight"]!])
    }
}

// MARK: - Optimizer

@Suite("server behaviour: optimizer")
struct OptimizerBehaviourTests {
    /// A server with gradients from one forward/backward through both layers.
    func serverWithGradients(seed: UInt64 = 1) throws -> (ServerHarness, OracleNetwork) {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness)
        try accumulate(harness, seed: seed)
        return (harness, oracle)
    }

    func accumulate(_ harness: ServerHarness, seed: UInt64) throws {
        let x = randomTensor([2, 3, 16], seed: seed), cx = randomTensor([2, 8, 5, 6], seed: seed + 1)
        let forward = try harness.result("forward", ["grad": true, "calls": [["module": "lin", "input": Wire.tensor(x)], ["module": "conv", "input": Wire.tensor(cx)]]])
        let tapes = try #require(forward["results"]?.arrayValue).map { try #require($0["tape"]) }
        try harness.result("backward", ["calls": [
            ["tape": tapes[0], "grad_output": Wire.tensor(randomTensor([2, 3, 24], seed: seed + 2))],
            ["tape": tapes[1], "grad_output": Wire.tensor(randomTensor([2, 12, 3, 4], seed: seed + 3))],
        ]])
    }

    func globalNorm(_ grads: [String: Tensor]) -> Double {
        grads.values.reduce(0.0) { $0 + $1.scalars.reduce(0.0) { $0 + Double($1) * Double($1) } }.squareRoot()
    }

    @Test("one SGD step (momentum 0, no weight decay) is exactly θ − lr·g")
    func sgdStep() throws {
        let (harness, _) = try serverWithGradients()
        let created = try harness.result("optimizer.create", ["type": "sgd", "lr": 0.1])
        #expect(created == ["type": "sgd", "step": 0])
        let theta = try harness.parameters(), grads = try harness.parameters(gradients: true)
        #expect(grads.values.allSatisfy { $0.maxAbs > 0 })
        let step = try harness.result("optimizer.step")
        #expect(step["step"] == 1)
        #expect(step["clipped"] == false)
        let norm = try #require(step["grad_norm"]?.doubleValue)
        #expect(abs(norm - globalNorm(grads)) <= 1e-5 * globalNorm(grads))
        let lr: Float = 0.1
        let after = try harness.parameters()
        for (key, value) in theta {
            let g = grads[key]!
            let expected = Tensor(shape: value.shape, scalars: value.scalars.indices.map { value.scalars[$0] - lr * g.scalars[$0] })
            #expect(after[key] == expected, "\(key)")
        }
        // zero_grad defaults to true.
        #expect(try harness.parameters(gradients: true).values.allSatisfy { $0.maxAbs == 0 })
    }

    @Test("SGD with weight decay and momentum over two steps, from torch.optim.SGD's definition")
    func sgdMomentum() throws {
        let (harness, _) = try serverWithGradients()
        try harness.result("optimizer.create", ["type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01])
        var theta = try harness.parameters()
        var buffers: [String: [Double]] = [:]
        for stepIndex in 0..<2 {
            if stepIndex == 1 { try accumulate(harness, seed: 40) }
            let grads = try harness.parameters(gradients: true)
            try harness.result("optimizer.step")
            let after = try harness.parameters()
            for (key, value) in theta {
                let g = grads[key]!
                var expected: [Double] = []
                var buffer = buffers[key] ?? []
                for i in value.scalars.indices {
                    let d = Double(g.scalars[i]) + 0.01 * Double(value.scalars[i])
                    let b = stepIndex == 0 ? d : 0.9 * buffer[i] + d
                    if stepIndex == 0 { buffer.append(b) } else { buffer[i] = b }
                    expected.append(Double(value.scalars[i]) - 0.05 * b)
                }
                buffers[key] = buffer
                let actual = after[key]!
                let worst = zip(actual.scalars, expected).map { abs(Double($0) - $1) }.max() ?? 0
                #expect(worst <= 1e-6, "\(key) step \(stepIndex + 1): \(worst)")
            }
            theta = after
        }
    }

    @Test("AdamW's first step: θ(1 − lr·λ) − lr·ĝ/(√v̂ + ε), computed from the definition")
    func adamWFirstStep() throws {
        let (harness, _) = try serverWithGradients()
        try harness.result("optimizer.create", ["type": "adamw", "lr": 0.01, "weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-6])
        let theta = try harness.parameters(), grads = try harness.parameters(gradients: true)
        try harness.result("optimizer.step")
        let after = try harness.parameters()
        let (lr, wd, b1, b2, eps) = (0.01, 0.1, Double(Float(0.8)), Double(Float(0.99)), 1e-6)
        for (key, value) in theta {
            let g = grads[key]!
            for i in value.scalars.indices {
                let gi = Double(g.scalars[i]), t = Double(value.scalars[i])
                let m = (1 - b1) * gi, v = (1 - b2) * gi * gi
                let mHat = m / (1 - b1), vHat = v / (1 - b2)
                let expected = t * (1 - lr * wd) - lr * mHat / (vHat.squareRoot() + eps)
                let actual = Double(after[key]!.scalars[i])
                #expect(abs(actual - expected) <= 2e-6, "\(key)[\(i)]: \(actual) vs \(expected)")
            }
        }
    }

    @Test("parameter groups: the first matching prefix sets lr and weight decay")
    func groups() throws {
        let (harness, _) = try serverWithGradients()
        try harness.result("optimizer.create", ["type": "sgd", "lr": 0.1, "groups": [["prefix": "conv.", "lr": 0], ["prefix": "c", "lr": 5]]])
        let theta = try harness.parameters(), grads = try harness.parameters(gradients: true)
        try harness.result("optimizer.step")
        let after = try harness.parameters()
        #expect(after["conv.lora_up.weight"] == theta["conv.lora_up.weight"])
        #expect(after["conv.lora_down.weight"] == theta["conv.lora_down.weight"])
        let key = "lin.lora_up.weight"
        let expected = Tensor(shape: theta[key]!.shape, scalars: theta[key]!.scalars.indices.map { theta[key]!.scalars[$0] - Float(0.1) * grads[key]!.scalars[$0] })
        #expect(after[key] == expected)
    }

    @Test("max_grad_norm clips the update to the given global norm; grad_norm is the norm before clipping")
    func clipping() throws {
        let (harness, _) = try serverWithGradients()
        let grads = try harness.parameters(gradients: true)
        let norm = globalNorm(grads)
        let maximum = norm / 4
        try harness.result("optimizer.create", ["type": "sgd", "lr": 1, "weight_decay": 0, "max_grad_norm": .double(maximum)])
        let theta = try harness.parameters()
        let step = try harness.result("optimizer.step")
        #expect(step["clipped"] == true)
        let reported = try #require(step["grad_norm"]?.doubleValue)
        #expect(abs(reported - norm) <= 1e-5 * norm, "grad_norm \(reported), computed \(norm)")
        let after = try harness.parameters()
        var updateNormSquared = 0.0
        let scale = Double(Float(maximum)) / (Double(Float(norm)) + 1e-6)
        for (key, value) in theta {
            for i in value.scalars.indices {
                let delta = Double(after[key]!.scalars[i]) - Double(value.scalars[i])
                updateNormSquared += delta * delta
                #expect(abs(delta + scale * Double(grads[key]!.scalars[i])) <= 1e-6, "\(key)[\(i)]")
            }
        }
        #expect(abs(updateNormSquared.squareRoot() - maximum) <= 1e-4 * maximum, "update norm \(updateNormSquared.squareRoot()) vs \(maximum)")

        // Below the limit nothing is clipped.
        let (unclipped, _) = try serverWithGradients()
        try unclipped.result("optimizer.create", ["type": "sgd", "lr": 1, "max_grad_norm": .double(norm * 2)])
        #expect(try unclipped.result("optimizer.step")["clipped"] == false)
    }

    @Test("optimizer.save then optimizer.load in a fresh server: the next step equals an uninterrupted run")
    func saveLoad() throws {
        // Uninterrupted: step 1, save, step 2.
        let (harness, _) = try serverWithGradients()
        try harness.result("optimizer.create", ["type": "adamw", "lr": 0.02, "weight_decay": 0.05, "betas": [0.85, 0.995],
                                                "max_grad_norm": 100, "groups": [["prefix": "conv.", "lr": 0.01, "weight_decay": 0]]])
        try harness.result("optimizer.step")
        let statePath = harness.path("optimizer.safetensors")
        let saved = try harness.result("optimizer.save", ["path": .string(statePath)])
        #expect(saved == ["path": .string(statePath), "step": 1])
        let afterOne = try harness.parameters()
        try accumulate(harness, seed: 70)
        let step2 = try harness.result("optimizer.step")
        #expect(step2["step"] == 2)
        let uninterrupted = try harness.parameters()

        // Interrupted: a fresh server with the step-1 parameters and the saved state.
        let fresh = try ServerHarness()
        _ = try OracleNetwork.create(in: fresh)
        var updates = JSONObject()
        for (key, tensor) in afterOne { updates[key] = Wire.tensor(tensor) }
        try fresh.result("parameters.set", ["parameters": .object(updates)])
        let loaded = try fresh.result("optimizer.load", ["path": .string(statePath)])
        #expect(loaded == ["type": "adamw", "step": 1])
        try accumulate(fresh, seed: 70)
        let freshStep = try fresh.result("optimizer.step")
        #expect(freshStep["step"] == 2)
        #expect(freshStep["grad_norm"] == step2["grad_norm"])
        #expect(try fresh.parameters() == uninterrupted)
    }
}

// MARK: - Files

@Suite("server behaviour: files")
struct FileBehaviourTests {
    @Test("network.save then network.load in a fresh server reproduces the forward outputs", arguments: adapterConfigs, layerSets)
    func saveLoad(_ config: AdapterConfig, _ layerSet: LayerSet) throws {
        let harness = try ServerHarness()
        let behaviourLayers = layerSet.layers
        let oracle = try OracleNetwork.create(in: harness, config: config, layers: behaviourLayers)
        let path = harness.path("net.safetensors")
        let saved = try harness.result("network.save", ["path": .string(path), "metadata": ["ss_note": "from the tests"]])
        #expect(saved["modules"] == JSONValue(behaviourLayers.count))
        #expect(saved["bytes"]?.intValue == (try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int))

        let fresh = try ServerHarness()
        _ = try OracleNetwork.create(in: fresh, config: config, layers: behaviourLayers, seed: 31)
        let loaded = try fresh.result("network.load", ["path": .string(path)])
        #expect(loaded["loaded"] == .array(behaviourLayers.map(\.name).sorted().map { .string($0) }))
        #expect(loaded["unmatched_file_modules"] == [])
        #expect(loaded["modules_not_in_file"] == [])
        #expect(loaded["metadata"]?["ss_note"] == "from the tests")
        for (index, layer) in behaviourLayers.enumerated() {
            let x = randomTensor(layer.inputShape, seed: 60 + UInt64(index))
            expectClose(try fresh.forward(layer.name, x), try oracle.delta(layer.name, x), tolerance: 2e-5, "\(config.label) reloaded \(layer.name)")
            expectClose(try fresh.forward(layer.name, x, extra: ["full": true]),
                        naiveLayer(layer.spec, x, weight: layer.weight, bias: layer.bias) + (try oracle.delta(layer.name, x)),
                        tolerance: 2e-5, "\(config.label) reloaded full \(layer.name)")
        }
    }

    @Test("network.save in F16 and BF16: the reloaded forward is the forward of the rounded parameters", arguments: [DType.f16, .bf16])
    func saveNarrow(_ dtype: DType) throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness)
        let path = harness.path("net16.safetensors")
        try harness.result("network.save", ["path": .string(path), "dtype": .string(dtype.rawValue)])
        let fresh = try ServerHarness()
        _ = try OracleNetwork.create(in: fresh, seed: 3)
        try fresh.result("network.load", ["path": .string(path)])
        let reloaded = try fresh.parameters()
        for (key, tensor) in try harness.parameters() {
            let rounded = try encodeFloats(tensor.scalars, as: dtype).withUnsafeBytes { decodeFloats($0, as: dtype) }
            #expect(reloaded[key]?.scalars == rounded, "\(key)")
        }
        let x = randomTensor([2, 3, 16], seed: 2)
        expectClose(try fresh.forward("lin", x), try oracle.delta("lin", x), tolerance: dtype == .f16 ? 3e-3 : 2e-2, "reloaded \(dtype)")
    }

    /// Base weights of the LyCORIS fixture model, by layer path.
    static func baseTensors() throws -> [String: Tensor] {
        let file = try AdapterFile(path: networkFixture("base"))
        var tensors: [String: Tensor] = [:]
        for module in file.modules {
            for (suffix, tensor) in try file.tensors(of: module) { tensors["\(module.name).\(suffix)"] = tensor }
        }
        return tensors
    }

    @Test("network.load of LyCORIS's lora.safetensors reproduces LyCORIS's layer outputs")
    func loadLyCORISFile() throws {
        let base = try Self.baseTensors()
        let expectedFile = try AdapterFile(path: networkFixture("lora.expected"))
        let xs = try expectedFile.tensors(of: try #require(expectedFile.modules.first { $0.name == "x" }))
        let ys = try expectedFile.tensors(of: try #require(expectedFile.modules.first { $0.name == "y" }))
        #expect(xs.count == 5)
        var layers: [JSONValue] = []
        var specs: [String: (LayerSpec, Tensor, Tensor)] = [:]
        for path in xs.keys.sorted() {
            let weight = try #require(base["\(path).weight"]), bias = base["\(path).bias"] ?? .zeros([weight.shape[0]])
            let name = "lycoris_" + path.replacingOccurrences(of: ".", with: "_")
            var layer: JSONObject = ["name": .string(name), "weight": Wire.tensor(weight), "bias": Wire.tensor(bias)]
            let spec: LayerSpec
            if weight.rank == 2 {
                spec = .linear(inFeatures: weight.shape[1], outFeatures: weight.shape[0])
                layer["kind"] = "linear"
                layer["in_features"] = JSONValue(weight.shape[1])
                layer["out_features"] = JSONValue(weight.shape[0])
            } else {
                let k = weight.shape[2]
                spec = .convolution(ConvGeometry(inChannels: weight.shape[1], outChannels: weight.shape[0], kernelSize: [k, k], padding: [(k - 1) / 2, (k - 1) / 2]))
                layer["kind"] = "conv2d"
                layer["in_channels"] = JSONValue(weight.shape[1])
                layer["out_channels"] = JSONValue(weight.shape[0])
                layer["kernel_size"] = JSONValue(k)
                layer["padding"] = JSONValue((k - 1) / 2)
            }
            specs[path] = (spec, weight, bias)
            layers.append(.object(layer))
        }
        let harness = try ServerHarness()
        try harness.result("network.create", ["layers": .array(layers), "options": ["lora_dim": 8]])
        let loaded = try harness.result("network.load", ["path": .string(networkFixture("lora")), "strict": true])
        #expect(loaded["loaded"]?.arrayValue?.count == 5)
        #expect(loaded["unmatched_file_modules"] == [])
        #expect(loaded["modules_not_in_file"] == [])
        #expect(loaded["metadata"]?["oracle"] == "lycoris-lora 4.1.3")
        let info = try harness.result("network.info")
        #expect(info["modules"]?.arrayValue?.allSatisfy { $0["rank"] == 4 && $0["algorithm"] == "locon" } == true)
        for path in xs.keys.sorted() {
            let name = "lycoris_" + path.replacingOccurrences(of: ".", with: "_")
            let x = xs[path]!, y = try #require(ys[path])
            expectClose(try harness.forward(name, x, extra: ["full": true]), y, tolerance: 1e-4, "LyCORIS output of \(path)")
            let (spec, weight, bias) = specs[path]!
            expectClose(try harness.forward(name, x), y - naiveLayer(spec, x, weight: weight, bias: bias), tolerance: 1e-3, "LyCORIS Δ of \(path)")
        }
    }
}

// MARK: - Arena

@Suite("server behaviour: arena")
struct ArenaBehaviourTests {
    /// A shared mapping of the arena file, as a client makes it.
    final class Mapping {
        let pointer: UnsafeMutableRawPointer
        let size: Int

        init(path: String, size: Int) throws {
            let fd = open(path, O_RDWR)
            guard fd >= 0 else { throw POSIXError(.ENOENT) }
            defer { close(fd) }
            let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            guard let pointer, pointer != MAP_FAILED else { throw POSIXError(.ENOMEM) }
            self.pointer = pointer
            self.size = size
        }

        deinit { munmap(pointer, size) }

        func write(_ tensor: Tensor, at offset: Int, as dtype: DType = .f32) throws {
            let bytes = try encodeFloats(tensor.scalars, as: dtype)
            precondition(offset + bytes.count <= size)
            bytes.withUnsafeBytes { (pointer + offset).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        }

        func bytes(at offset: Int, count: Int) -> [UInt8] {
            Array(UnsafeRawBufferPointer(start: pointer + offset, count: count))
        }

        func read(_ shape: [Int], at offset: Int, as dtype: DType = .f32) -> Tensor {
            let raw = UnsafeRawBufferPointer(start: pointer + offset, count: shape.product * dtype.byteSize)
            return Tensor(shape: shape, scalars: decodeFloats(raw, as: dtype))
        }
    }

    @Test("arena: create, tensors in and out through the mapped file, resize, release")
    func arenaLifecycle() throws {
        let harness = try ServerHarness()
        let oracle = try OracleNetwork.create(in: harness)
        let initialize = try harness.result("initialize")
        #expect(initialize["capabilities"]?["arena"]?["directory"] == .string(harness.directory.path))

        let created = try harness.result("arena.create", ["size": JSONValue(1 << 20)])
        let path = try #require(created["path"]?.stringValue)
        #expect(created["size"] == JSONValue(1 << 20))
        #expect(path.hasPrefix(harness.directory.path + "/lycoris-arena-"))
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect(attributes[.size] as? Int == 1 << 20)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        var mapping = try Mapping(path: path, size: 1 << 20)

        // Input (F32) and output (F32) in the arena.
        let x = randomTensor([2, 3, 16], seed: 1)
        try mapping.write(x, at: 4096)
        let result = try harness.result("forward", ["grad": true, "calls": [[
            "module": "lin", "input": ["dtype": "F32", "shape": [2, 3, 16], "offset": 4096], "output": ["offset": 65536],
        ]]])
        #expect(result["results"]?[0]?["output"] == ["dtype": "F32", "shape": [2, 3, 24], "offset": 65536])
        let expected = try oracle.delta("lin", x)
        expectClose(mapping.read([2, 3, 24], at: 65536), expected, "output read from the arena")
        let tape = try #require(result["results"]?[0]?["tape"])

        // A BF16 input and an F16 output: the bytes are exactly encodeFloats' bytes.
        try mapping.write(x, at: 8192, as: .bf16)
        let narrow = try harness.result("forward", ["calls": [[
            "module": "lin", "input": ["dtype": "BF16", "shape": [2, 3, 16], "offset": 8192], "output": ["offset": 70002, "dtype": "F16"],
        ]]])
        #expect(narrow["results"]?[0]?["output"] == ["dtype": "F16", "shape": [2, 3, 24], "offset": 70002])
        let xb = mapping.read([2, 3, 16], at: 8192, as: .bf16)
        let yb = try oracle.delta("lin", xb)
        let written = Tensor(shape: [2, 3, 24], scalars: mapping.bytes(at: 70002, count: 144 * 2).withUnsafeBytes { decodeFloats($0, as: .f16) })
        expectClose(written, Tensor(shape: yb.shape, scalars: try encodeFloats(yb.scalars, as: .f16).withUnsafeBytes { decodeFloats($0, as: .f16) }),
                    tolerance: 1e-3, "F16 output of a BF16 input")

        // Backward: grad_output in the arena, grad_input and a parameter gradient into it.
        let g = randomTensor([2, 3, 24], seed: 2)
        try mapping.write(g, at: 131072)
        let backward = try harness.result("backward", ["return_parameter_grads": true, "calls": [[
            "tape": tape, "grad_output": ["dtype": "F32", "shape": [2, 3, 24], "offset": 131072],
            "grad_input": ["offset": 196608], "parameter_grads": ["lin.lora_up.weight": ["offset": 262144]],
        ]]])
        let expectedGrads = try oracle.backward("lin", x, g)
        #expect(backward["results"]?[0]?["grad_input"] == ["dtype": "F32", "shape": [2, 3, 16], "offset": 196608])
        expectClose(mapping.read([2, 3, 16], at: 196608), expectedGrads.input, "grad_input in the arena")
        expectClose(mapping.read([24, 4], at: 262144), expectedGrads.parameters["lin.lora_up.weight"]!, "lora_up grad in the arena")
        let downGrad = try Wire.decode(backward["results"]?[0]?["parameter_grads"]?["lin.lora_down.weight"])
        expectClose(downGrad, expectedGrads.parameters["lin.lora_down.weight"]!, "lora_down grad inline")

        // parameters.get and delta_weight into the arena.
        let parameters = try harness.parameters()
        try harness.result("parameters.get", ["keys": ["conv.lora_down.weight"], "outputs": ["conv.lora_down.weight": ["offset": 300000]]])
        #expect(mapping.read([4, 8, 3, 3], at: 300000) == parameters["conv.lora_down.weight"])
        try harness.result("delta_weight", ["modules": ["conv"], "outputs": ["conv": ["offset": 400000]]])
        var unused = RandomSource(seed: 0)
        let conv = oracle["conv"]
        expectClose(mapping.read([12, 8, 3, 3], at: 400000), try conv.effectiveDeltaWeight(conv.makeTape(inputShape: [], random: &unused)), "ΔW in the arena")

        // Resize: same file, bigger; the client maps it again.
        let resized = try harness.result("arena.resize", ["size": JSONValue(4 << 20)])
        #expect(resized == ["path": .string(path), "size": JSONValue(4 << 20)])
        #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int == 4 << 20)
        mapping = try Mapping(path: path, size: 4 << 20)
        // What was written before is still there.
        expectClose(mapping.read([2, 3, 24], at: 65536), expected, "old output after the resize")
        let x2 = randomTensor([5, 16], seed: 9)
        try mapping.write(x2, at: 3 << 20)
        try harness.result("forward", ["calls": [["module": "lin", "input": ["dtype": "F32", "shape": [5, 16], "offset": JSONValue(3 << 20)], "output": ["offset": JSONValue((3 << 20) + 4096)]]]])
        expectClose(mapping.read([5, 24], at: (3 << 20) + 4096), try oracle.delta("lin", x2), "output past the old end")
        // Shrink: descriptors past the new end are refused.
        try harness.result("arena.resize", ["size": 8192])
        let outside = try harness.error("forward", ["calls": [["module": "lin", "input": ["dtype": "F32", "shape": [5, 16], "offset": JSONValue(3 << 20)]]]])
        expectError(outside, code: -32006, "lie outside the arena of 8192 bytes")

        // Release unlinks the file; the arena is gone for descriptors; a new one can be made.
        try harness.result("arena.release")
        #expect(!FileManager.default.fileExists(atPath: path))
        let gone = try harness.error("forward", ["calls": [["module": "lin", "input": ["dtype": "F32", "shape": [1, 16], "offset": 0]]]])
        expectError(gone, code: -32006, "none exists")
        let again = try harness.result("arena.create", ["size": 4096])
        let newPath = try #require(again["path"]?.stringValue)
        #expect(newPath != path)
        #expect(FileManager.default.fileExists(atPath: newPath))
        try harness.expectServes(oracle)
    }

    @Test("shutdown in process: null result, the arena file unlinked")
    func shutdownReleasesArena() throws {
        let harness = try ServerHarness()
        _ = try OracleNetwork.create(in: harness)
        let path = try #require(try harness.result("arena.create", ["size": 4096])["path"]?.stringValue)
        #expect(FileManager.default.fileExists(atPath: path))
        let response = try harness.call("shutdown")
        #expect(response.result == .null)
        #expect(harness.service.shutdownRequested)
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("initialize advertises what the server computes")
    func capabilities() throws {
        let harness = try ServerHarness(initialize: false)
        let result = try harness.result("initialize", ["protocol_version": "1.0"])
        #expect(result["server"]?["name"] == "lycoris-server")
        let capabilities = try #require(result["capabilities"])
        #expect(capabilities["algorithms"] == .array(Algorithm.allCases.map { .string($0.rawValue) }))
        #expect(capabilities["algorithms"] == ["locon", "loha", "lokr", "ia3", "dylora", "glora", "full", "diag-oft", "boft", "norms", "tlora"])
        #expect(capabilities["dtypes"] == ["F32", "F16", "BF16"])
        #expect(capabilities["layer_kinds"] == ["linear", "conv1d", "conv2d", "conv3d", "layer_norm", "group_norm"])
        #expect(capabilities["framings"] == ["ndjson", "content-length"])
        #expect(capabilities["optimizers"] == ["adamw", "sgd"])
        #expect(capabilities["arena"]?["maximum_size"] == .integer(64 << 30))
    }
}
