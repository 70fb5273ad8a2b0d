import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import LycorisFormats
import Testing

/// The norm algorithm beyond the LyCORIS fixtures: which layers it adapts, its description
/// checks, files written here, and a bias-free layer's b_norm.
@Suite("Norm")
struct NormTests {
    static let groupNorm = LayerSpec.norm(Normalization(kind: .group(groups: 2, channels: 6)))
    static let layerNorm = LayerSpec.norm(Normalization(kind: .layer(normalizedShape: [2, 3]), hasBias: false))

    @Test("only norm adapts norm layers, and norm adapts nothing else (new and loaded modules)")
    func layerCompatibility() throws {
        var random = RandomSource(seed: 1)
        for algorithm in [Algorithm.locon, .loha, .lokr, .ia3, .dylora] {
            #expect {
                _ = try algorithm.makeAdapter(layer: Self.groupNorm, options: AdapterOptions(), random: &random)
            } throws: { "\($0)" == "\(algorithm.rawValue) cannot adapt a group_norm layer (only norm adapts layer_norm and group_norm layers)" }
        }
        #expect {
            _ = try Algorithm.norms.makeAdapter(layer: .linear(inFeatures: 4, outFeatures: 4), options: AdapterOptions(), random: &random)
        } throws: { "\($0)" == "norm adapts only layer_norm and group_norm layers" }
        let lora = try AdapterFile(path: NetworkFixture.path("lora"))
        #expect {
            _ = try lora.adapter(for: lora.modules[0], layer: Self.layerNorm)
        } throws: { "\($0)".contains("locon cannot adapt a layer_norm layer") }
    }

    @Test("invalid norm descriptions are refused with the reason", arguments: [
        (Normalization(kind: .group(groups: 4, channels: 6)), "num_groups 4 must divide num_channels 6"),
        (Normalization(kind: .group(groups: 0, channels: 6)), "num_groups and num_channels must be positive (got 0, 6)"),
        (Normalization(kind: .layer(normalizedShape: [])), "normalized_shape must be a non-empty list of positive extents, got []"),
        (Normalization(kind: .layer(normalizedShape: [4, 0])), "normalized_shape must be a non-empty list of positive extents, got [4, 0]"),
        (Normalization(kind: .layer(normalizedShape: [4]), eps: -1), "eps must be finite and non-negative, got -1.0"),
    ])
    func invalid(_ normalization: Normalization, _ reason: String) throws {
        #expect(LayerSpec.norm(normalization).invalidReason == reason)
        var random = RandomSource(seed: 1)
        #expect {
            _ = try Algorithm.norms.makeAdapter(layer: .norm(normalization), options: AdapterOptions(), random: &random)
        } throws: { "\($0)" == "invalid layer: \(reason)" }
    }

    @Test("inputs must end with normalized_shape, or be (N, C, …) for group norm", arguments: [
        (groupNorm, [2, 6], nil), (groupNorm, [2, 6, 4, 3, 2], nil), (groupNorm, [6], "group_norm input must be (N, 6, …), got shape [6]"),
        (groupNorm, [2, 5, 3], "group_norm input must be (N, 6, …), got shape [2, 5, 3]"),
        (layerNorm, [2, 3], nil), (layerNorm, [4, 5, 2, 3], nil), (layerNorm, [3, 2], "layer_norm input must end with [2, 3], got shape [3, 2]"),
    ] as [(LayerSpec, [Int], String?)])
    func inputs(_ layer: LayerSpec, _ shape: [Int], _ problem: String?) {
        #expect(layer.inputProblem(shape) == problem)
    }

    @Test("fresh modules are zero (the layer's output unchanged); w_norm and b_norm have numel(W0) elements")
    func freshModule() throws {
        var random = RandomSource(seed: 2)
        let adapter = try Algorithm.norms.makeAdapter(layer: Self.layerNorm, options: AdapterOptions(rank: 8, alpha: 3), random: &random)
        #expect(adapter.parameters.names == ["w_norm", "b_norm"])
        #expect(adapter.parameters.entries.allSatisfy { $0.tensor == .zeros([6]) })
        #expect(adapter.rank == nil && adapter.scale == 1 && !adapter.adaptsBias)
        let module = AdapterModule(name: "ln", algorithm: adapter, options: AdapterOptions(), baseWeight: randomTensor([2, 3], seed: 3))
        let x = randomTensor([4, 2, 3], seed: 4)
        #expect(try module.forward(x, tape: module.makeTape(inputShape: x.shape, random: &random)) == Self.layerNorm.apply(x, weight: module.baseWeight!))
    }

    @Test("save → load keeps w_norm and b_norm (b_norm saved without a bias too) and the outputs")
    func roundTrip() throws {
        var network = Network()
        var random = RandomSource(seed: 5)
        var modules: [AdapterModule] = []
        for (name, layer) in [("lycoris_gn", Self.groupNorm), ("lycoris_ln", Self.layerNorm)] {
            var adapter = try Algorithm.norms.makeAdapter(layer: layer, options: AdapterOptions(), random: &random)
            for (key, tensor) in adapter.parameters.entries { adapter.parameters[key] = .normal(tensor.shape, std: 0.5, using: &random) }
            let hasBias = layer.normalization!.hasBias
            var module = AdapterModule(name: name, algorithm: adapter, options: AdapterOptions(),
                                       baseWeight: .normal(layer.weightShape, std: 0.5, using: &random),
                                       baseBias: hasBias ? .normal(layer.biasShape, std: 0.5, using: &random) : nil)
            module.multiplier = 0.7
            try network.add(module)
            modules.append(module)
        }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("norms-\(UUID()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try network.save(toPath: path)
        let file = try AdapterFile(path: path)
        #expect(file.modules.map(\.algorithm) == [.norms, .norms])
        #expect(file.modules.allSatisfy { Set($0.tensors.keys) == ["w_norm", "b_norm"] })
        let (loaded, unmatched) = try Network.load(file, layers: Dictionary(uniqueKeysWithValues: modules.map {
            ($0.name, ($0.layer, $0.baseWeight, $0.baseBias))
        }))
        #expect(unmatched.isEmpty)
        for module in modules {
            var reloaded = try #require(loaded[module.name])
            reloaded.multiplier = module.multiplier
            #expect(reloaded.algorithm.parameters == module.algorithm.parameters)
            let x = randomTensor(module.layer.normalization!.kindName == "group_norm" ? [2, 6, 5] : [3, 2, 3], seed: 6)
            let tape = module.makeTape(inputShape: x.shape, random: &random)
            #expect(try reloaded.forward(x, tape: tape) == module.forward(x, tape: tape))
        }
    }

    @Test("a file without b_norm loads it as zeros; w_norm of another size is refused by name")
    func loadShapes() throws {
        let loaded = try Algorithm.norms.loadAdapter(layer: Self.groupNorm, tensors: ["w_norm": randomTensor([6], seed: 7)], alpha: nil)
        #expect(loaded.parameters["b_norm"] == .zeros([6]))
        #expect {
            _ = try Algorithm.norms.loadAdapter(layer: Self.layerNorm, tensors: ["w_norm": .zeros([2])], alpha: nil)
        } throws: { "\($0)" == "norms: w_norm has shape [2], expected [6] for this layer" }
    }
}
