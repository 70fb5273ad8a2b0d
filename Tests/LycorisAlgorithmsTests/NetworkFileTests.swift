import Foundation
import LycorisAlgorithms
import LycorisCheckpoints
import LycorisCore
import LycorisTestSupport
import LycorisFormats
import Testing

/// Files written by LyCORIS (wrapper `lycoris_` names and kohya `lora_unet_` names):
/// detection, loading, merging; and files written here: round trips.
@Suite("Network files")
struct NetworkFileTests {
    @Test("detects the algorithm of every LyCORIS file", arguments: [
        ("lora", Algorithm.locon), ("loha", .loha), ("lokr", .lokr), ("ia3", .ia3), ("dylora", .locon),
        ("glora", .glora), ("full", .full), ("diag-oft", .diagOFT), ("boft", .boft), ("tlora", .tlora),
        ("kohya_lora", .locon), ("dora", .locon), ("dora_loha_input", .loha),
    ])
    func detection(_ name: String, _ algorithm: Algorithm) throws {
        let file = try AdapterFile(path: NetworkFixture.path(name))
        #expect(file.modules.count == 5)
        for module in file.modules { #expect(module.algorithm == algorithm, "\(name): \(module.name)") }
    }

    @Test("norm modules are told apart from the LoRA modules beside them")
    func mixedFile() throws {
        let file = try AdapterFile(path: NetworkFixture.path("norms"))
        let counts = file.modules.reduce(into: [Algorithm: Int]()) { $0[$1.algorithm!, default: 0] += 1 }
        #expect(counts == [.locon: 5, .norms: 1])
    }

    @Test("LyCORIS files load onto their layers and reproduce LyCORIS's outputs",
          arguments: ["lora", "loha", "lokr", "ia3", "dylora", "glora", "full", "dora", "dora_loha_input", "diag-oft", "boft"])
    func loadAndForward(_ algo: String) throws {
        let base = try NetworkFixture.base
        let file = try AdapterFile(path: NetworkFixture.path(algo))
        var layers: [String: (spec: LayerSpec, weight: Tensor?, bias: Tensor?)] = [:]
        for info in base.tensors where info.name.hasSuffix(".weight") && info.shape.count >= 2 {
            let path = String(info.name.dropLast(".weight".count))
            let bias = base.contains("\(path).bias") ? try base.tensor("\(path).bias") : nil
            layers[KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: path)] =
                (NetworkFixture.layer(weightShape: info.shape), try base.tensor(info.name), bias)
        }
        let (network, unmatched) = try Network.load(file, layers: layers)
        #expect(unmatched.isEmpty)
        var random = RandomSource(seed: 0)
        let expected = try NetworkFixture.expectedLayers(algo)
        #expect(!expected.isEmpty)
        for (key, x, y) in expected {
            let name = KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: String(key.dropLast(".weight".count)))
            let module = try #require(network[name], "no module \(name)")
            let tape = module.makeTape(inputShape: x.shape, random: &random)
            expectClose(try module.forward(x, tape: tape), y, "\(algo) \(key)")
        }
    }

    @Test("merge gives weights whose outputs equal LyCORIS's adapted outputs",
          arguments: ["lora", "loha", "lokr", "ia3", "dylora", "kohya_lora", "glora", "full", "dora", "dora_loha_input", "diag-oft", "boft"])
    func merge(_ algo: String) throws {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("merged-\(algo)-\(UUID()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let report = try CheckpointMerge.merge(checkpoint: NetworkFixture.path("base"), adapters: [.init(path: NetworkFixture.path(algo), multiplier: 1)],
                                               output: output)
        #expect(report.unmatched.isEmpty && report.failed.isEmpty, "\(report.unmatched) \(report.failed)")
        #expect(report.merged.count == 5)
        let merged = try SafetensorsFile(path: output)
        let base = try NetworkFixture.base
        #expect(merged.tensorNames == base.tensorNames)
        #expect(try merged.tensor("mid_block.norm.weight") == base.tensor("mid_block.norm.weight"))
        let expectations = try NetworkFixture.expectedLayers(algo == "kohya_lora" ? "lora" : algo)
        for (key, x, y) in expectations {
            let weight = try merged.tensor(key)
            let layer = NetworkFixture.layer(weightShape: weight.shape)
            var out = layer.apply(x, weight: weight)
            let biasKey = String(key.dropLast(".weight".count)) + ".bias"
            if merged.contains(biasKey) { layer.addBias(&out, bias: try merged.tensor(biasKey)) }
            expectClose(out, y, "\(algo) merged \(key)")
        }
    }

    @Test("LyCORIS files on conv1d and conv3d layers load and reproduce LyCORIS's outputs; merging them too",
          arguments: ["convnd_lora", "convnd_loha", "convnd_lokr"])
    func convNdLoadForwardAndMerge(_ stem: String) throws {
        let base = try SafetensorsFile(path: NetworkFixture.path("convnd_base"))
        let file = try AdapterFile(path: NetworkFixture.path(stem))
        var layers: [String: (spec: LayerSpec, weight: Tensor?, bias: Tensor?)] = [:]
        for (path, spec) in try NetworkFixture.convNdLayers() {
            layers[KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: path)] =
                (spec, try base.tensor("\(path).weight"), try base.tensor("\(path).bias"))
        }
        let (network, unmatched) = try Network.load(file, layers: layers)
        #expect(unmatched.isEmpty && network.modules.count == 4)
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("merged-\(stem)-\(UUID()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let report = try CheckpointMerge.merge(checkpoint: NetworkFixture.path("convnd_base"), adapters: [.init(path: NetworkFixture.path(stem), multiplier: 1)],
                                               output: output)
        #expect(report.merged.count == 4 && report.failed.isEmpty, "\(report.failed)")
        let merged = try SafetensorsFile(path: output)
        var random = RandomSource(seed: 0)
        let expected = try NetworkFixture.expectedLayers(stem)
        #expect(expected.count == 4)
        for (key, x, y) in expected {
            let path = String(key.dropLast(".weight".count))
            let module = try #require(network[KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: path)])
            expectClose(try module.forward(x, tape: module.makeTape(inputShape: x.shape, random: &random)), y, "\(stem) \(key)")
            var out = module.layer.apply(x, weight: try merged.tensor(key))
            module.layer.addBias(&out, bias: try merged.tensor("\(path).bias"))
            expectClose(out, y, "\(stem) merged \(key)")
        }
    }

    @Test("LyCORIS's train_norm file (LoRA + norm on the LayerNorm) loads and reproduces every layer's output")
    func normsFile() throws {
        let base = try NetworkFixture.base
        var layers: [String: (spec: LayerSpec, weight: Tensor?, bias: Tensor?)] = [:]
        for (path, spec) in try NetworkFixture.layers() {
            let bias = base.contains("\(path).bias") ? try base.tensor("\(path).bias") : nil
            layers[KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: path)] = (spec, try base.tensor("\(path).weight"), bias)
        }
        let (network, unmatched) = try Network.load(try AdapterFile(path: NetworkFixture.path("norms")), layers: layers)
        #expect(unmatched.isEmpty)
        let norm = try #require(network["lycoris_mid_block_norm"])
        #expect(norm.algorithm is Norm && norm.algorithm.adaptsBias)
        var random = RandomSource(seed: 0)
        let expected = try NetworkFixture.expectedLayers("norms")
        #expect(expected.count == 6)
        for (key, x, y) in expected {
            let module = try #require(network[KeySchema.moduleName(prefix: KeySchema.genericPrefix, path: String(key.dropLast(".weight".count)))])
            expectClose(try module.forward(x, tape: module.makeTape(inputShape: x.shape, random: &random)), y, "norms \(key)")
        }
    }

    @Test("merging the train_norm file changes the LayerNorm's weight and bias; the merged model gives LyCORIS's outputs")
    func mergeNorms() throws {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("merged-norms-\(UUID()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let report = try CheckpointMerge.merge(checkpoint: NetworkFixture.path("base"), adapters: [.init(path: NetworkFixture.path("norms"), multiplier: 1)],
                                               output: output)
        #expect(report.unmatched.isEmpty && report.failed.isEmpty, "\(report.unmatched) \(report.failed)")
        #expect(report.merged.count == 6 && report.mergedBiases == ["mid_block.norm.bias"])
        let merged = try SafetensorsFile(path: output)
        let layers = try NetworkFixture.layers()
        for (key, x, y) in try NetworkFixture.expectedLayers("norms") {
            let path = String(key.dropLast(".weight".count))
            let layer = try #require(layers[path])
            var out = layer.apply(x, weight: try merged.tensor(key))
            if merged.contains("\(path).bias") { layer.addBias(&out, bias: try merged.tensor("\(path).bias")) }
            expectClose(out, y, "norms merged \(key)")
        }
    }

    @Test("merge reports modules that match no base weight")
    func mergeUnmatched() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("merge-unmatched-\(UUID())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var network = Network()
        var random = RandomSource(seed: 3)
        let layer = LayerSpec.linear(inFeatures: 16, outFeatures: 24)
        try network.add(AdapterModule(name: "lycoris_down_blocks_0_attentions_0_proj_in",
                                      algorithm: try Algorithm.locon.makeAdapter(layer: layer, options: AdapterOptions(), random: &random),
                                      options: AdapterOptions()))
        try network.add(AdapterModule(name: "lora_unet_no_such_layer",
                                      algorithm: try Algorithm.locon.makeAdapter(layer: layer, options: AdapterOptions(), random: &random),
                                      options: AdapterOptions()))
        let adapterPath = dir.appendingPathComponent("a.safetensors").path
        try network.save(toPath: adapterPath)
        let report = try CheckpointMerge.merge(checkpoint: NetworkFixture.path("base"), adapters: [.init(path: adapterPath, multiplier: 1)],
                                               output: dir.appendingPathComponent("out.safetensors").path)
        #expect(report.unmatched.map(\.module) == ["lora_unet_no_such_layer"])
        #expect(report.merged.map(\.key) == ["down_blocks.0.attentions.0.proj_in.weight"])
    }
}
