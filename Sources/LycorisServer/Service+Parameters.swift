import LycorisAlgorithms
import LycorisCore
import LycorisRPC

/// Parameters and gradients by key: `<module>.<parameter>` (e.g.
/// `lora_unet_mid_block_proj_in.lora_up.weight`, `….scalar`).
extension LycorisService {
    /// Splits a key at the module name (module names contain no dots).
    func resolve(_ key: String, path: String) throws -> (module: AdapterModule, parameter: String) {
        guard let (moduleName, parameter) = KeySchema.split(key: key) else { throw RPCError.unknownModule(key, kind: "parameter") }
        let module = try module(moduleName)
        guard module.algorithm.parameters[parameter] != nil else { throw RPCError.unknownModule(key, kind: "parameter") }
        return (module, parameter)
    }

    /// Every parameter key, in network order.
    var allParameterKeys: [String] {
        network?.modules.flatMap { module in module.algorithm.parameters.names.map { "\(module.name).\($0)" } } ?? []
    }

    func parametersGet(_ p: Params) throws -> JSONValue {
        _ = try requireNetwork()
        return try collect(p) { module, parameter in module.algorithm.parameters.required(parameter) }
    }

    func gradientsGet(_ p: Params) throws -> JSONValue {
        _ = try requireNetwork()
        return try collect(p) { module, parameter in
            self.gradients[module.name]?[parameter] ?? .zeros(module.algorithm.parameters.required(parameter).shape)
        }
    }

    /// `{keys?, outputs?, dtype?}` → `{"parameters": {key: tensor}}`.
    private func collect(_ p: Params, value: (AdapterModule, String) -> Tensor) throws -> JSONValue {
        let keys = p.has("keys") ? try p.strings("keys") : allParameterKeys
        let outputs = p.has("outputs") ? try p.object("outputs") : try Params(nil, path: "outputs")
        let dtype = p.has("dtype") ? try TensorTransport.dtype(try p.string("dtype"), path: "dtype") : .f32
        var result = JSONObject()
        for (index, key) in keys.enumerated() {
            let (module, parameter) = try resolve(key, path: "keys[\(index)]")
            let destination = try TensorTransport.destination(outputs.object[key], path: outputs.at(key), defaultDType: dtype)
            result[key] = try transport.write(value(module, parameter), to: destination, path: outputs.at(key))
        }
        return ["parameters": .object(result)]
    }

    /// `{parameters: {key: tensor}}`: every value is checked (key, shape, finite) before any
    /// is written.
    func parametersSet(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        let given = try p.object("parameters")
        var updates: [(module: String, parameter: String, value: Tensor)] = []
        for (key, value) in given.object.members {
            let (module, parameter) = try resolve(key, path: given.at(key))
            let tensor = try RPCError.naming(module: module.name, pass: "parameters") {
                try transport.read(value, path: given.at(key)).tensor
            }
            let expected = module.algorithm.parameters.required(parameter).shape
            guard tensor.shape == expected else {
                throw RPCError.shapeMismatch("\(key) has shape \(expected), got \(tensor.shape)", path: given.at(key))
            }
            updates.append((module.name, parameter, tensor))
        }
        for (name, parameter, value) in updates {
            var module = network[name]!
            module.algorithm.parameters[parameter] = value
            network[name] = module
        }
        self.network = network
        return ["updated": JSONValue(updates.count)]
    }

    func gradientsZero(_ p: Params) throws -> JSONValue {
        _ = try requireNetwork()
        gradients = [:]
        return .null
    }
}
