import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats
import LycorisRPC

/// The optimizer living in the server, for clients without one of their own: AdamW or SGD
/// with momentum, a learning rate and weight decay per parameter group (groups match key
/// prefixes, first match wins), gradient clipping by global norm, state saved and restored.
struct OptimizerSettings {
    struct Group {
        var prefix: String
        var learningRate: Float
        var weightDecay: Float
    }
    var optimizer: Optimizer
    var learningRate: Float
    var weightDecay: Float
    var maxGradNorm: Float
    var groups: [Group]

    func hyperparameters(for key: String) -> (learningRate: Float, weightDecay: Float) {
        if let group = groups.first(where: { key.hasPrefix($0.prefix) }) { return (group.learningRate, group.weightDecay) }
        return (learningRate, weightDecay)
    }
}

extension LycorisService {
    func optimizerCreate(_ p: Params) throws -> JSONValue {
        _ = try requireNetwork()
        let typeName = try p.string("type", default: "adamw")
        guard let kind = Optimizer.Kind(rawValue: typeName.lowercased()) else {
            throw RPCError.invalidParams("type must be adamw or sgd, got \"\(typeName)\"", path: "type")
        }
        var optimizer = Optimizer(kind: kind)
        if p.has("betas") {
            let betas = try p.array("betas").map { $0.doubleValue ?? .nan }
            guard betas.count == 2, betas.allSatisfy({ $0 >= 0 && $0 < 1 }) else {
                throw RPCError.invalidParams("betas must be two numbers in [0, 1)", path: "betas")
            }
            optimizer.beta1 = Float(betas[0])
            optimizer.beta2 = Float(betas[1])
        }
        optimizer.epsilon = try p.float("eps", default: 1e-8)
        optimizer.momentum = try p.float("momentum", default: 0)
        optimizer.nesterov = try p.bool("nesterov", default: false)
        let learningRate = try p.float("lr")
        guard learningRate >= 0 else { throw RPCError.invalidParams("lr must be non-negative", path: "lr") }
        let weightDecay = try p.float("weight_decay", default: kind == .adamw ? 0.01 : 0)
        var groups: [OptimizerSettings.Group] = []
        if p.has("groups") {
            for group in try p.objects("groups") {
                groups.append(.init(prefix: try group.string("prefix"), learningRate: try group.float("lr", default: learningRate),
                                    weightDecay: try group.float("weight_decay", default: weightDecay)))
            }
        }
        self.optimizer = OptimizerSettings(optimizer: optimizer, learningRate: learningRate, weightDecay: weightDecay,
                                           maxGradNorm: try p.float("max_grad_norm", default: 0), groups: groups)
        return ["type": .string(kind.rawValue), "step": 0]
    }

    /// One step on the accumulated gradients: clip by global norm (torch's
    /// `clip_grad_norm_`: scale by max/(norm + 1e-6) when norm > max), update, and zero the
    /// gradients unless `zero_grad` is false. Non-finite gradients change nothing.
    func optimizerStep(_ p: Params) throws -> JSONValue {
        var network = try requireNetwork()
        guard var settings = optimizer else { throw RPCError.state("no optimizer: call optimizer.create first") }
        var squared = 0.0
        for grads in gradients.values { for (_, g) in grads.entries { squared += Double(g.dot(g)) } }
        let norm = Float(squared.squareRoot())
        guard norm.isFinite else { throw RPCError.nonFinite("gradients", count: 1) }
        let clip = settings.maxGradNorm > 0 && norm > settings.maxGradNorm ? settings.maxGradNorm / (norm + 1e-6) : 1
        settings.optimizer.beginStep()
        for module in network.modules {
            guard let grads = gradients[module.name] else { continue }
            var updated = module
            for (parameter, gradient) in grads.entries {
                let key = "\(module.name).\(parameter)"
                var value = updated.algorithm.parameters.required(parameter)
                let (lr, wd) = settings.hyperparameters(for: key)
                settings.optimizer.update(key: key, value: &value, gradient: clip == 1 ? gradient : gradient * clip,
                                          learningRate: lr, weightDecay: wd)
                updated.algorithm.parameters[parameter] = value
            }
            network[module.name] = updated
        }
        self.network = network
        optimizer = settings
        if try p.bool("zero_grad", default: true) { gradients = [:] }
        return ["step": JSONValue(settings.optimizer.step), "grad_norm": JSONValue(norm), "clipped": .bool(clip != 1)]
    }

    /// Saves the optimizer state as safetensors: `<key>/<slot>` tensors, settings in metadata.
    func optimizerSave(_ p: Params) throws -> JSONValue {
        guard let settings = optimizer else { throw RPCError.state("no optimizer: call optimizer.create first") }
        let path = try p.string("path")
        let o = settings.optimizer
        let groups = settings.groups.map { "\($0.prefix)\t\($0.learningRate)\t\($0.weightDecay)" }.joined(separator: "\n")
        var writer = SafetensorsWriter(metadata: [
            "type": o.kind.rawValue, "step": "\(o.step)", "lr": "\(settings.learningRate)", "weight_decay": "\(settings.weightDecay)",
            "max_grad_norm": "\(settings.maxGradNorm)", "beta1": "\(o.beta1)", "beta2": "\(o.beta2)", "eps": "\(o.epsilon)",
            "momentum": "\(o.momentum)", "nesterov": "\(o.nesterov)", "groups": groups,
        ])
        do {
            for key in o.state.keys.sorted() {
                for slot in o.state[key]!.keys.sorted() { try writer.add("\(key)/\(slot)", o.state[key]![slot]!) }
            }
            try writer.write(toPath: path)
        } catch let error as SafetensorsError {
            throw RPCError.io(error.description, path: path, rule: error.rule)
        }
        return ["path": .string(path), "step": JSONValue(o.step)]
    }

    func optimizerLoad(_ p: Params) throws -> JSONValue {
        _ = try requireNetwork()
        let path = try p.string("path")
        let file: SafetensorsFile
        do { file = try SafetensorsFile(path: path) } catch let error as SafetensorsError { throw RPCError.io(error.description, path: path, rule: error.rule) }
        let m = file.metadata
        func number(_ key: String) throws -> Float {
            guard let text = m[key], let value = Float(text) else { throw RPCError.io("optimizer file lacks \(key)", path: path) }
            return value
        }
        guard let kind = m["type"].flatMap(Optimizer.Kind.init(rawValue:)), let step = m["step"].flatMap(Int.init) else {
            throw RPCError.io("not an optimizer state file (type and step metadata missing)", path: path)
        }
        var o = Optimizer(kind: kind)
        o.step = step
        (o.beta1, o.beta2, o.epsilon, o.momentum) = (try number("beta1"), try number("beta2"), try number("eps"), try number("momentum"))
        o.nesterov = m["nesterov"] == "true"
        for name in file.tensorNames {
            guard let slash = name.lastIndex(of: "/") else { continue }
            let key = String(name[..<slash]), slot = String(name[name.index(after: slash)...])
            let (module, parameter) = try resolve(key, path: "state")
            let tensor = try file.tensor(name)
            guard tensor.shape == module.algorithm.parameters.required(parameter).shape else {
                throw RPCError.shapeMismatch("optimizer state \(name) has shape \(tensor.shape)", path: name)
            }
            o.state[key, default: [:]][slot] = tensor
        }
        let groups: [OptimizerSettings.Group] = (m["groups"] ?? "").split(separator: "\n").compactMap { line in
            let parts = line.split(separator: "\t", omittingEmptySubsequences: false)
            guard parts.count == 3, let lr = Float(parts[1]), let wd = Float(parts[2]) else { return nil }
            return .init(prefix: String(parts[0]), learningRate: lr, weightDecay: wd)
        }
        optimizer = OptimizerSettings(optimizer: o, learningRate: try number("lr"), weightDecay: try number("weight_decay"),
                                      maxGradNorm: try number("max_grad_norm"), groups: groups)
        return ["type": .string(kind.rawValue), "step": JSONValue(step)]
    }
}
