import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// One golden case written by `scripts/generate_fixtures.py` from LyCORIS 4.1.3 (run in
/// float64): the layer, the options, every parameter, an input and upstream gradient, and
/// LyCORIS's ΔW, output, input gradient, parameter gradients and saved tensors.
struct ModuleFixture {
    let name: String
    let file: SafetensorsFile
    let algorithm: Algorithm
    let layer: LayerSpec
    let options: AdapterOptions
    let multiplier: Float
    let bypass: Bool
    let dyloraBlock: Int?
    let scale: Float
    /// LyCORIS's saved state: [key, shape, dtype].
    let savedKeys: [(key: String, shape: [Int], dtype: String)]

    static var allNames: [String] {
        let directory = fixturesDirectory.appendingPathComponent("modules")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return files.filter { $0.hasSuffix(".safetensors") }.map { String($0.dropLast(".safetensors".count)) }.sorted()
    }

    init(_ name: String) throws {
        self.name = name
        file = try SafetensorsFile(path: fixturesDirectory.appendingPathComponent("modules/\(name).safetensors").path)
        let meta = file.metadata
        guard let algo = meta["algo"].flatMap(Algorithm.init(rawValue:)) else { throw FixtureError("\(name): unknown algo") }
        algorithm = algo
        let layerJSON = try JSONSerialization.jsonObject(with: Data(meta["layer"]!.utf8)) as! [String: Any]
        let kind = layerJSON["kind"] as? String
        if kind == "linear" {
            layer = .linear(inFeatures: layerJSON["in_features"] as! Int, outFeatures: layerJSON["out_features"] as! Int)
        } else if kind == "layer_norm" || kind == "group_norm" {
            let normKind: Normalization.Kind = kind == "layer_norm"
                ? .layer(normalizedShape: layerJSON["normalized_shape"] as! [Int])
                : .group(groups: layerJSON["num_groups"] as! Int, channels: layerJSON["num_channels"] as! Int)
            layer = .norm(Normalization(kind: normKind, eps: layerJSON["eps"] as! Double, hasBias: layerJSON["has_bias"] as! Bool))
        } else {
            layer = .convolution(ConvGeometry(
                inChannels: layerJSON["in_channels"] as! Int, outChannels: layerJSON["out_channels"] as! Int,
                kernelSize: layerJSON["kernel_size"] as! [Int], stride: layerJSON["stride"] as? [Int],
                padding: layerJSON["padding"] as? [Int], dilation: layerJSON["dilation"] as? [Int],
                groups: layerJSON["groups"] as! Int))
        }
        let optionsData = Data(meta["options"]!.utf8)
        options = try JSONDecoder().decode(AdapterOptions.self, from: optionsData)
        let raw = try JSONSerialization.jsonObject(with: optionsData) as! [String: Any]
        multiplier = (raw["multiplier"] as? Double).map(Float.init) ?? 1
        bypass = meta["bypass"] == "true"
        dyloraBlock = meta["dylora_block"].flatMap(Int.init)
        scale = Float(meta["scale"]!)!
        let keys = try JSONSerialization.jsonObject(with: Data(meta["saved_keys"]!.utf8)) as! [[Any]]
        savedKeys = keys.map { ($0[0] as! String, $0[1] as! [Int], $0[2] as! String) }
    }

    func tensor(_ name: String) throws -> Tensor { try file.tensor(name) }

    /// Names of the `param.*` tensors, without the prefix.
    var parameterNames: [String] { file.tensorNames.filter { $0.hasPrefix("param.") }.map { String($0.dropFirst(6)) } }

    /// A module built the way a user builds one (fresh, from the options), with its
    /// parameters then replaced by the fixture's values.
    func makeModule() throws -> AdapterModule {
        var random = RandomSource(seed: 1)
        let baseBias = file.contains("base.bias") ? try tensor("base.bias") : nil
        var adapter = try algorithm.makeAdapter(layer: layer, options: options, random: &random,
                                                baseWeight: try tensor("base.weight"), hasBias: baseBias != nil)
        let fresh = Dictionary(uniqueKeysWithValues: adapter.parameters.entries.map { ($0.name, $0.tensor.shape) })
        let given = Dictionary(uniqueKeysWithValues: try parameterNames.map { ($0, try tensor("param.\($0)").shape) })
        guard fresh == given else {
            throw FixtureError("\(name): parameter shapes \(fresh.sorted { $0.key < $1.key }) differ from LyCORIS's \(given.sorted { $0.key < $1.key })")
        }
        for parameter in parameterNames { adapter.parameters[parameter] = try tensor("param.\(parameter)") }
        var module = AdapterModule(name: "lycoris_fixture", algorithm: adapter, options: options,
                                   baseWeight: try tensor("base.weight"),
                                   baseBias: baseBias)
        module.multiplier = multiplier
        if file.contains("timestep_mask") { module.timestepMask = try tensor("timestep_mask") }
        return module
    }

    /// The step's choices: DyLoRA's block as the fixture fixed it.
    func tape(for module: AdapterModule) -> AdapterModule.Tape {
        var random = RandomSource(seed: 2)
        var tape = module.makeTape(inputShape: (try? tensor("input").shape) ?? [], random: &random)
        if let dyloraBlock { tape.context.block = dyloraBlock }
        return tape
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
