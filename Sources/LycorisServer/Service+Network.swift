import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats
import LycorisRPC

extension LycorisService {
    /// Algorithm names accepted on the wire (kohya's `algo` values).
    static func algorithm(named name: String, path: String) throws -> Algorithm {
        let normalized = name.lowercased()
        let algorithm: Algorithm? = normalized == "lora" ? .locon : normalized == "norm" ? .norms : Algorithm(rawValue: normalized)
        guard let algorithm else {
            throw RPCError.adapter("unknown algorithm \"\(name)\"; known: lora, locon, loha, lokr, ia3, dylora, glora, full, diag-oft, boft, tlora, norm", path: path)
        }
        return algorithm
    }

    /// `kernel_size`, `stride`… given as one integer (every axis) or an array of one entry
    /// per spatial axis (1 for conv1d, 2 for conv2d, 3 for conv3d).
    static func extents(_ p: Params, _ key: String, axes: Int, default fallback: Int) throws -> [Int] {
        guard p.has(key) else { return [Int](repeating: fallback, count: axes) }
        if let single = try p.value(key).intValue { return [Int](repeating: single, count: axes) }
        let values = try p.ints(key)
        guard values.count == axes else {
            let shape = axes == 2 ? "a pair" : "an array of \(axes) integer\(axes == 1 ? "" : "s")"
            throw RPCError.invalidParams("\(p.at(key)) must be an integer or \(shape), got \(values.count) entries", path: p.at(key))
        }
        return values
    }

    /// Limits that keep a hostile layer description from exhausting memory.
    static let maximumExtent = 1 << 20
    static let maximumWeightElements = 1 << 32

    static func layerSpec(_ p: Params) throws -> LayerSpec {
        let kind = try p.string("kind")
        let spec: LayerSpec
        switch kind {
        case "linear":
            spec = .linear(inFeatures: try p.int("in_features"), outFeatures: try p.int("out_features"))
        case "conv1d", "conv2d", "conv3d":
            let axes = kind == "conv1d" ? 1 : kind == "conv2d" ? 2 : 3
            spec = .convolution(ConvGeometry(
                inChannels: try p.int("in_channels"), outChannels: try p.int("out_channels"),
                kernelSize: try extents(p, "kernel_size", axes: axes, default: 1), stride: try extents(p, "stride", axes: axes, default: 1),
                padding: try extents(p, "padding", axes: axes, default: 0), dilation: try extents(p, "dilation", axes: axes, default: 1),
                groups: try p.int("groups", default: 1)))
        case "layer_norm", "group_norm":
            spec = .norm(try normalization(p, kind: kind))
        default:
            throw RPCError.invalidParams("\(p.at("kind")) must be linear, conv1d, conv2d, conv3d, layer_norm or group_norm, got \"\(kind)\"", path: p.at("kind"))
        }
        if let problem = spec.invalidReason { throw RPCError.invalidParams("\(p.path): \(problem)", path: p.path) }
        let extents = spec.weightShape
        guard extents.allSatisfy({ $0 <= maximumExtent }), extents.reduce(1.0, { $0 * Double($1) }) <= Double(maximumWeightElements) else {
            throw RPCError.invalidParams("\(p.path): weight shape \(extents) exceeds the limits (each extent ≤ \(maximumExtent), ≤ \(maximumWeightElements) elements)", path: p.path)
        }
        return spec
    }

    /// LyCORIS keyword options, plus kohya's `conv_dim`/`conv_alpha` for convolutions whose
    /// kernel's first extent is not 1 (LyCORIS looks at that extent only: a (1, 3) conv2d
    /// or (1, 3, 3) conv3d takes `lora_dim`/`alpha`, a (3, 1) conv2d takes `conv_dim`).
    static func options(_ value: JSONObject, layer: LayerSpec, path: String) throws -> AdapterOptions? {
        var object = value
        let known = Set(AdapterOptions.optionNames + ["conv_dim", "conv_alpha"])
        for key in object.keys where !known.contains(key) {
            throw RPCError.invalidParams("unknown option \"\(key)\" (known: \(known.sorted().joined(separator: ", ")))", path: "\(path).\(key)")
        }
        if let first = layer.kernelSize.first, first != 1 {
            if let convDim = object["conv_dim"] {
                if convDim.intValue == 0 { return nil }
                object["lora_dim"] = convDim
            }
            if let convAlpha = object["conv_alpha"] { object["alpha"] = convAlpha }
        }
        object["conv_dim"] = nil
        object["conv_alpha"] = nil
        do {
            let options = try JSONDecoder().decode(AdapterOptions.self, from: Data(JanssonCodec.encode(.object(object))))
            if let problem = options.invalidReason { throw RPCError.invalidParams(problem, path: path) }
            // The largest factor set (LoHa's two pairs) must stay within the weight limit.
            let factorElements = 2 * Double(options.rank) * Double(layer.weightInFeatures * layer.kernelElements + layer.outFeatures)
            guard options.rank <= maximumExtent, factorElements <= Double(maximumWeightElements) else {
                throw RPCError.invalidParams("lora_dim \(options.rank) is too large for this layer", path: "\(path).lora_dim")
            }
            return options
        } catch let error as DecodingError {
            throw RPCError.invalidParams("\(path): \(Self.describe(error))", path: path)
        }
    }

    static func describe(_ error: DecodingError) -> String {
        switch error {
        case let .typeMismatch(_, context), let .valueNotFound(_, context), let .dataCorrupted(context):
            let key = context.codingPath.map(\.stringValue).joined(separator: ".")
            return key.isEmpty ? context.debugDescription : "option \(key) has the wrong type (\(context.debugDescription))"
        case let .keyNotFound(key, _): return "missing option \(key.stringValue)"
        @unknown default: return "\(error)"
        }
    }

    func networkCreate(_ p: Params) throws -> JSONValue {
        guard network == nil else { throw RPCError.state("a network exists already (one network per server)") }
        let device = try p.string("device", default: "cpu")
        // A local generator: a call that fails leaves the server's random state untouched.
        var random = p.has("seed") ? RandomSource(seed: try Self.seed(p)) : self.random
        let defaultAlgorithm = try Self.algorithm(named: try p.string("algo", default: "lora"), path: "algo")
        let defaultOptions = p.has("options") ? try p.object("options").object : JSONObject()
        let multiplier = try p.float("multiplier", default: 1)
        var created = Network()
        var skipped: [JSONValue] = []
        for layer in try p.objects("layers") {
            let name = try layer.string("name")
            let spec = try Self.layerSpec(layer)
            let algorithm = layer.has("algo") ? try Self.algorithm(named: try layer.string("algo"), path: layer.at("algo")) : defaultAlgorithm
            var optionObject = defaultOptions
            if layer.has("options") { for (key, value) in try layer.object("options").object.members { optionObject[key] = value } }
            guard let options = try Self.options(optionObject, layer: spec, path: layer.at("options")) else {
                skipped.append(.string(name))
                continue
            }
            let weight = layer.has("weight") ? try transport.read(try layer.value("weight"), path: layer.at("weight")).tensor : nil
            let bias = layer.has("bias") ? try transport.read(try layer.value("bias"), path: layer.at("bias")).tensor : nil
            if let weight, weight.shape != spec.weightShape {
                throw RPCError.shapeMismatch("\(layer.at("weight")) has shape \(weight.shape), the layer needs \(spec.weightShape)", path: layer.at("weight"))
            }
            if bias != nil, spec.normalization?.hasBias == false {
                throw RPCError.invalidParams("\(layer.at("bias")) is given for a layer with has_bias false", path: layer.at("bias"))
            }
            if let bias, bias.shape != spec.biasShape {
                throw RPCError.shapeMismatch("\(layer.at("bias")) has shape \(bias.shape), the layer needs \(spec.biasShape)", path: layer.at("bias"))
            }
            if algorithm.needsBaseWeight(options) && weight == nil {
                let user = !options.weightDecompose || !algorithm.decomposesWeight ? algorithm.rawValue : "\(algorithm.rawValue) with weight_decompose (DoRA)"
                throw RPCError.adapter("\(user) needs the base weight of \(name) (layer.weight)", path: layer.at("weight"))
            }
            // Full trains diff_b where the layer has a bias (has_bias; default: whether bias is sent).
            let hasBias = spec.normalization == nil ? try layer.bool("has_bias", default: bias != nil) : false
            let adapter: any AdapterAlgorithm
            do {
                adapter = try algorithm.makeAdapter(layer: spec, options: options, random: &random, baseWeight: weight, hasBias: hasBias)
            } catch let error as AdapterError {
                throw RPCError.adapter("\(name): \(error.description)", path: layer.path)
            }
            var module = AdapterModule(name: name, algorithm: adapter, options: options, baseWeight: weight, baseBias: bias)
            module.multiplier = multiplier
            do {
                try created.add(module)
            } catch let error as AdapterError {
                throw RPCError.invalidParams(error.description, path: layer.at("name"))
            }
        }
        deviceSession = try openDeviceSession(device, network: created)
        network = created
        self.random = random
        gradients = [:]
        var info = try networkInfo(Params(nil))
        if case var .object(object) = info {
            object["skipped_layers"] = .array(skipped)
            info = .object(object)
        }
        return info
    }

    static func layerJSON(_ spec: LayerSpec) -> JSONValue {
        switch spec {
        case let .linear(inFeatures, outFeatures):
            return ["kind": "linear", "in_features": JSONValue(inFeatures), "out_features": JSONValue(outFeatures)]
        case let .convolution(g):
            return ["kind": .string(g.kind), "in_channels": JSONValue(g.inChannels), "out_channels": JSONValue(g.outChannels),
                    "kernel_size": JSONValue(g.kernelSize), "stride": JSONValue(g.stride), "padding": JSONValue(g.padding),
                    "dilation": JSONValue(g.dilation), "groups": JSONValue(g.groups)]
        case let .norm(normalization):
            return normalizationJSON(normalization)
        }
    }

    func networkInfo(_ p: Params) throws -> JSONValue {
        let network = try requireNetwork()
        let modules: [JSONValue] = network.modules.enumerated().map { handle, module in
            let algorithm = module.algorithm
            return [
                "name": .string(module.name),
                "handle": JSONValue(handle),
                "algorithm": .string(type(of: algorithm).algorithm.rawValue),
                "layer": Self.layerJSON(module.layer),
                "rank": algorithm.rank.map { JSONValue($0) } ?? .null,
                "scale": JSONValue(algorithm.scale),
                "multiplier": JSONValue(module.multiplier),
                "factor_path": .bool(module.hasCheaperFactorPath),
                "factor_multiply_adds": module.hasCheaperFactorPath ? algorithm.bypassCost.map { JSONValue($0) } ?? .null : .null,
                "elementwise": module.elementwiseSide.map { .string($0.rawValue) } ?? .null,
                "parameters": .array(algorithm.parameters.entries.map {
                    ["key": .string("\(module.name).\($0.name)"), "shape": JSONValue($0.tensor.shape)]
                }),
            ]
        }
        return [
            "modules": .array(modules),
            "parameter_count": JSONValue(network.parameterCount),
            "training": .bool(network.modules.first?.isTraining ?? false),
            "pending_tapes": JSONValue(pending.count),
        ]
    }

    func networkSave(_ p: Params) throws -> JSONValue {
        let network = try requireNetwork()
        let path = try p.string("path")
        let dtypeName = try p.string("dtype", default: "F32")
        guard let dtype = DType(rawValue: dtypeName), [.f32, .f16, .bf16].contains(dtype) else {
            throw RPCError.dtypeMismatch("files are saved as F32, F16 or BF16, not \(dtypeName)", path: "dtype")
        }
        var metadata: [String: String] = [:]
        if p.has("metadata") {
            for (key, value) in try p.object("metadata").object.members {
                guard case let .string(text) = value else {
                    throw RPCError.invalidParams("metadata.\(key) must be a string (safetensors metadata maps strings to strings)", path: "metadata.\(key)")
                }
                metadata[key] = text
            }
        }
        for module in network.modules {
            for (name, tensor) in module.algorithm.parameters.entries where !tensor.isFinite {
                throw RPCError.nonFinite("\(module.name).\(name)", count: tensor.scalars.filter { !$0.isFinite }.count,
                                         module: module.name, pass: "save")
            }
        }
        do {
            try network.save(toPath: path, dtype: dtype, metadata: metadata)
        } catch let error as SafetensorsError {
            throw RPCError.io(error.description, path: path, rule: error.rule)
        }
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
        return ["path": .string(path), "bytes": JSONValue(size), "modules": JSONValue(network.modules.count)]
    }

    func networkLoad(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        let path = try p.string("path")
        let file: AdapterFile
        do {
            file = try AdapterFile(path: path)
        } catch let error as SafetensorsError {
            throw RPCError.io(error.description, path: path, rule: error.rule)
        }
        var loaded: [JSONValue] = []
        var unmatched: [JSONValue] = []
        var replacements: [AdapterModule] = []
        for fileModule in file.modules {
            guard var module = network[fileModule.name] else {
                unmatched.append(.string(fileModule.name))
                continue
            }
            do {
                let dora = fileModule.tensors["dora_scale"] != nil
                if let algorithm = fileModule.algorithm, algorithm.needsBaseWeight(AdapterOptions()) || dora, module.baseWeight == nil {
                    let what = dora ? "\(algorithm.rawValue) with dora_scale (DoRA)" : algorithm.rawValue
                    throw AdapterError("\(what) needs the layer's base weight, which this network was created without (layers[].weight)")
                }
                module.algorithm = try file.adapter(for: fileModule, layer: module.layer, baseWeight: module.baseWeight)
            } catch let error as AdapterError {
                throw RPCError.adapter("\(fileModule.name): \(error.description)", path: path)
            }
            replacements.append(module)
            loaded.append(.string(fileModule.name))
        }
        if try p.bool("strict", default: false) && !unmatched.isEmpty {
            throw RPCError.unknownModule(unmatched.compactMap(\.stringValue).joined(separator: ", "))
        }
        for module in replacements { network[module.name] = module }
        self.network = network
        gradients = [:]
        // Tapes recorded with the replaced adapters would mix old inputs with new weights.
        pending.removeAll()
        // The modules may have other parameters now: a device network is bound again.
        deviceSession?.unbind()
        // Loaded parameters start a new optimisation: moments of the old values (possibly of
        // other shapes) no longer apply.
        optimizer?.optimizer.state = [:]
        let missing = network.names.filter { name in !file.modules.contains { $0.name == name } }
        return ["loaded": .array(loaded), "unmatched_file_modules": .array(unmatched),
                "modules_not_in_file": .array(missing.map { .string($0) }), "metadata": .object(JSONObject(file.metadata))]
    }

    func networkSetMultiplier(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        network.setMultiplier(try p.float("multiplier"))
        self.network = network
        return .null
    }

    func networkSetTraining(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        network.setTraining(try p.bool("training"))
        self.network = network
        return .null
    }

    /// T-LoRA's rank mask (LyCORIS `set_timestep_mask`): `mask` a list of finite numbers (one
    /// per rank; each module takes its first r, padded with 1s), or null/absent for all ranks.
    func networkSetTimestepMask(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        var mask: Tensor?
        if p.has("mask") {
            let values = try p.array("mask").enumerated().map { index, item -> Float in
                guard let d = item.doubleValue, Float(d).isFinite else {
                    throw RPCError.invalidParams("\(p.at("mask"))[\(index)] must be a finite number", path: "\(p.at("mask"))[\(index)]")
                }
                return Float(d)
            }
            guard !values.isEmpty else { throw RPCError.invalidParams("\(p.at("mask")) must not be empty", path: p.at("mask")) }
            mask = Tensor(shape: [values.count], scalars: values)
        }
        network.setTimestepMask(mask)
        self.network = network
        return .null
    }

    func networkSeed(_ p: Params) throws -> JSONValue {
        random = RandomSource(seed: try Self.seed(p))
        return .null
    }

    /// The `seed` parameter: a non-negative integer.
    static func seed(_ p: Params) throws -> UInt64 {
        let seed = try p.int("seed")
        guard seed >= 0 else { throw RPCError.invalidParams("seed must be non-negative, got \(seed)", path: p.at("seed")) }
        return UInt64(seed)
    }
}

extension JSONObject {
    init(_ dictionary: [String: String]) {
        self.init()
        for (key, value) in dictionary.sorted(by: { $0.key < $1.key }) { self[key] = .string(value) }
    }
}
