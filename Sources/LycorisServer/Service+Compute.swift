import LycorisAlgorithms
import LycorisCore
import LycorisRPC

extension LycorisService {
    /// `forward`: m·Δ(x) (or, with `"full": true`, the whole adapted output, which needs
    /// the layer's weight; with `"elementwise": true`, the elementwise transfer's adapted
    /// tensor, see ``AdapterModule/forwardElementwise(_:tape:)``) for each call; in training
    /// mode (or with `"grad": true`) each call leaves a tape for its backward.
    func forward(_ p: Params) throws -> JSONValue {
        let network = try requireNetwork()
        let calls = try p.objects("calls")
        // Validate every call before computing any, so a bad call changes nothing.
        var prepared: [(call: Params, module: AdapterModule, x: Tensor, layerInput: Tensor?, kind: PendingCall.Kind,
                        destination: TensorTransport.Destination)] = []
        for call in calls {
            let name = try call.string("module")
            guard let module = network[name] else { throw RPCError.unknownModule(name) }
            let (x, dtype) = try RPCError.naming(module: name, pass: "forward") {
                try transport.read(try call.value("input"), path: call.at("input"))
            }
            let full = try call.bool("full", default: false)
            let elementwise = try call.bool("elementwise", default: false)
            var layerInput: Tensor?
            if full && elementwise {
                throw RPCError.invalidParams("\(call.at("full")) and \(call.at("elementwise")) exclude each other", path: call.at("elementwise"))
            }
            if elementwise {
                if module.elementwiseSide == nil {
                    throw RPCError.state("\(name) has no elementwise transfer (only ia3 without dropout and rank_dropout has one)")
                }
                if let problem = module.elementwiseProblem(x.shape) { throw RPCError.shapeMismatch(problem, path: call.at("input")) }
                layerInput = try elementwiseLayerInput(call, module: module, baseOutput: x.shape)
            } else if let problem = module.layer.inputProblem(x.shape) {
                throw RPCError.shapeMismatch(problem, path: call.at("input"))
            }
            if full && module.baseWeight == nil {
                throw RPCError.state("\(name) has no base weight, so \"full\" output is not available (send layers[].weight at network.create)")
            }
            let destination = try TensorTransport.destination(call.object["output"], path: call.at("output"), defaultDType: dtype)
            let count = elementwise ? x.count : module.layer.outputShape(forInput: x.shape).product
            try transport.validate(destination, count: count, path: call.at("output"))
            prepared.append((call, module, x, layerInput, elementwise ? .elementwise : full ? .full : .delta, destination))
        }
        let keepTapes = try p.bool("grad", default: network.modules.first?.isTraining ?? false)
        if keepTapes { try reserveTapes(prepared.count) }
        var results: [JSONValue] = []
        for (call, module, x, layerInput, kind, destination) in prepared {
            let tape = module.makeTape(inputShape: layerInput?.shape ?? x.shape, random: &random)
            // What the backward reads: the tensor sent, or what DoRA's factor path saved.
            var saved = x
            let y: Tensor
            switch kind {
            case .full: y = try module.forward(x, tape: tape)
            case .elementwise:
                if let layerInput {
                    (y, saved) = try module.forwardElementwise(x, layerInput: layerInput, tape: tape)
                } else {
                    y = try module.forwardElementwise(x, tape: tape)
                }
            case .delta, .deltaWeight: y = try module.forwardDelta(x, tape: tape)
            }
            var result: JSONObject = ["module": .string(module.name), "output": try transport.write(y, to: destination, path: call.at("output"))]
            if keepTapes {
                result["tape"] = .integer(store(PendingCall(module: module.name, input: saved, layerInput: layerInput, tape: tape, kind: kind)))
            }
            results.append(.object(result))
        }
        return ["results": .array(results)]
    }

    /// The `layer_input` of an elementwise call: required (and shaped for `baseOutput`) for
    /// modules with side output_with_input (DoRA), refused for the others.
    private func elementwiseLayerInput(_ call: Params, module: AdapterModule, baseOutput: [Int]) throws -> Tensor? {
        let path = call.at("layer_input")
        guard module.elementwiseSide == .outputWithInput else {
            if call.has("layer_input") {
                throw RPCError.invalidParams("\(path) is only for modules whose elementwise side is output_with_input", path: path)
            }
            return nil
        }
        guard call.has("layer_input") else {
            throw RPCError.invalidParams("\(module.name) takes its elementwise transfer with the layer input: \(path) is required", path: path)
        }
        let x = try RPCError.naming(module: module.name, pass: "forward") { try transport.read(try call.value("layer_input"), path: path).tensor }
        if let problem = module.layer.inputProblem(x.shape) { throw RPCError.shapeMismatch(problem, path: path) }
        guard module.layer.outputShape(forInput: x.shape) == baseOutput else {
            throw RPCError.shapeMismatch("\(call.at("input")) has shape \(baseOutput), expected the output shape \(module.layer.outputShape(forInput: x.shape)) of \(path)", path: call.at("input"))
        }
        return x
    }

    /// Checks, before a call computes anything, that `count` more tapes fit the limit.
    func reserveTapes(_ count: Int) throws {
        if pending.count + count > Self.maximumPending {
            throw RPCError.state("\(pending.count) calls are still waiting for backward (limit \(Self.maximumPending) tapes)")
        }
    }

    /// Keeps a call for its backward; returns its tape id.
    func store(_ call: PendingCall) -> Int64 {
        let id = nextTape
        nextTape += 1
        pending[id] = call
        return id
    }

    /// `delta_weight`: m·ΔW per module (rebuild mode: the client applies W0 + ΔW itself), and
    /// m·Δb (`delta_bias`) for modules that adapt the bias (its output spec in `bias_outputs`).
    func deltaWeight(_ p: Params) throws -> JSONValue {
        let network = try requireNetwork()
        let names = p.has("modules") ? try p.strings("modules") : network.names
        let modules = try names.map { try module($0) }
        let outputs = p.has("outputs") ? try p.object("outputs") : try Params(nil, path: "outputs")
        let biasOutputs = p.has("bias_outputs") ? try p.object("bias_outputs") : try Params(nil, path: "bias_outputs")
        let dtype = p.has("dtype") ? try TensorTransport.dtype(try p.string("dtype"), path: "dtype") : .f32
        let keepTapes = try p.bool("grad", default: network.modules.first?.isTraining ?? false)
        let destinations = try modules.map { module in
            let destination = try TensorTransport.destination(outputs.object[module.name], path: outputs.at(module.name), defaultDType: dtype)
            try transport.validate(destination, count: module.layer.weightShape.product, path: outputs.at(module.name))
            guard module.algorithm.adaptsBias else { return (destination, nil as TensorTransport.Destination?) }
            let biasDestination = try TensorTransport.destination(biasOutputs.object[module.name], path: biasOutputs.at(module.name), defaultDType: dtype)
            try transport.validate(biasDestination, count: module.layer.biasShape.product, path: biasOutputs.at(module.name))
            return (destination, biasDestination)
        }
        if keepTapes { try reserveTapes(modules.count) }
        var results: [JSONValue] = []
        for (module, (destination, biasDestination)) in zip(modules, destinations) {
            let tape = module.makeTape(inputShape: [], random: &random)
            let delta = try module.effectiveDeltaWeight(tape)
            var result: JSONObject = ["module": .string(module.name),
                                      "delta_weight": try transport.write(delta, to: destination, path: outputs.at(module.name))]
            if let biasDestination, let deltaBias = try module.effectiveDeltaBias(tape) {
                result["delta_bias"] = try transport.write(deltaBias, to: biasDestination, path: biasOutputs.at(module.name))
            }
            if keepTapes {
                result["tape"] = .integer(store(PendingCall(module: module.name, input: Tensor.zeros([]), tape: tape, kind: .deltaWeight)))
            }
            results.append(.object(result))
        }
        return ["results": .array(results)]
    }

    /// `backward`: ∂x for each forward tape, and the parameter gradients, accumulated into
    /// the server's gradient buffers (and returned with `return_parameter_grads`).
    func backward(_ p: Params) throws -> JSONValue {
        try backwardCalls(p, gradientKey: "grad_output")
    }

    /// `delta_weight_backward`: parameter gradients from ∂L/∂(m·ΔW) for each ΔW tape.
    func deltaWeightBackward(_ p: Params) throws -> JSONValue {
        try backwardCalls(p, gradientKey: "grad")
    }

    private func backwardCalls(_ p: Params, gradientKey: String) throws -> JSONValue {
        let network = try requireNetwork()
        let expectDeltaWeight = gradientKey == "grad"
        let returnGrads = try p.bool("return_parameter_grads", default: false)
        let accumulate = try p.bool("accumulate", default: true)
        typealias Prepared = (id: Int64, record: PendingCall, module: AdapterModule, gradient: Tensor, biasGradient: Tensor?,
                              inputDestination: TensorTransport.Destination, gradDestinations: [String: TensorTransport.Destination],
                              gradPaths: [String: String], inputPath: String, layerInputOutput: (destination: TensorTransport.Destination, path: String)?, keep: Bool)
        var prepared: [Prepared] = []
        var seen = Set<Int64>()
        for call in try p.objects("calls") {
            let id = Int64(try call.int("tape"))
            guard let record = pending[id], !seen.contains(id) else { throw RPCError.unknownModule(String(id), kind: "tape") }
            guard (record.kind == .deltaWeight) == expectDeltaWeight else {
                throw RPCError.state("tape \(id) belongs to \(record.kind == .deltaWeight ? "delta_weight" : "forward"); use \(record.kind == .deltaWeight ? "delta_weight_backward" : "backward")")
            }
            guard let module = network[record.module] else { throw RPCError.unknownModule(record.module) }
            let (gradient, dtype) = try RPCError.naming(module: module.name, pass: "backward") {
                try transport.read(try call.value(gradientKey), path: call.at(gradientKey))
            }
            let expected = switch record.kind {
            case .deltaWeight: module.layer.weightShape
            case .elementwise: record.input.shape
            case .delta, .full: module.layer.outputShape(forInput: record.input.shape)
            }
            guard gradient.shape == expected else {
                throw RPCError.shapeMismatch("\(call.at(gradientKey)) has shape \(gradient.shape), expected \(expected)", path: call.at(gradientKey))
            }
            let biasGradient = expectDeltaWeight ? try deltaBiasGradient(call, module: module) : nil
            // Every output destination is checked now, so no call fails after another has
            // consumed its tape or accumulated its gradients.
            let inputDestination = try TensorTransport.destination(call.object["grad_input"], path: call.at("grad_input"), defaultDType: dtype)
            if record.kind != .deltaWeight {
                try transport.validate(inputDestination, count: record.input.count, path: call.at("grad_input"))
            }
            // DoRA's factor path returns ∂x of the layer input too.
            var layerInputOutput: (destination: TensorTransport.Destination, path: String)?
            if let layerInput = record.layerInput {
                let path = call.at("grad_layer_input")
                let destination = try TensorTransport.destination(call.object["grad_layer_input"], path: path, defaultDType: dtype)
                try transport.validate(destination, count: layerInput.count, path: path)
                layerInputOutput = (destination, path)
            }
            var gradDestinations: [String: TensorTransport.Destination] = [:]
            var gradPaths: [String: String] = [:]
            if returnGrads {
                let outputs = call.has("parameter_grads") ? try call.object("parameter_grads") : try Params(nil, path: call.at("parameter_grads"))
                for (name, tensor) in module.algorithm.parameters.entries {
                    let key = "\(module.name).\(name)"
                    let destination = try TensorTransport.destination(outputs.object[key], path: outputs.at(key), defaultDType: .f32)
                    try transport.validate(destination, count: tensor.count, path: outputs.at(key))
                    gradDestinations[key] = destination
                    gradPaths[key] = outputs.at(key)
                }
            }
            seen.insert(id)
            prepared.append((id, record, module, gradient, biasGradient, inputDestination, gradDestinations, gradPaths, call.at("grad_input"),
                             layerInputOutput, try call.bool("keep", default: false)))
        }
        var results: [JSONValue] = []
        for (id, record, module, gradient, biasGradient, inputDestination, gradDestinations, gradPaths, inputPath, layerInputOutput, keep) in prepared {
            var result: JSONObject = [:]
            let parameterGrads: ParameterSet
            switch record.kind {
            case .deltaWeight:
                parameterGrads = try module.effectiveDeltaWeightBackward(gradient, biasGradient: biasGradient, record.tape)
            case .elementwise where record.layerInput != nil && layerInputOutput != nil:
                let grads = try module.backwardElementwise(saved: record.input, layerInput: record.layerInput!, gradOutput: gradient, tape: record.tape)
                parameterGrads = grads.parameters
                result["grad_input"] = try transport.write(grads.input, to: inputDestination, path: inputPath)
                result["grad_layer_input"] = try transport.write(grads.layerInput, to: layerInputOutput!.destination, path: layerInputOutput!.path)
            case .delta, .full, .elementwise:
                let grads = switch record.kind {
                case .full: try module.backward(record.input, gradOutput: gradient, tape: record.tape)
                case .elementwise: try module.backwardElementwise(record.input, gradOutput: gradient, tape: record.tape)
                case .delta, .deltaWeight: try module.backwardDelta(record.input, gradOutput: gradient, tape: record.tape)
                }
                parameterGrads = grads.parameters
                result["grad_input"] = try transport.write(grads.input, to: inputDestination, path: inputPath)
            }
            if returnGrads {
                var grads = JSONObject()
                for (name, tensor) in parameterGrads.entries {
                    let key = "\(module.name).\(name)"
                    grads[key] = try transport.write(tensor, to: gradDestinations[key] ?? .inline(.f32), path: gradPaths[key] ?? key)
                }
                result["parameter_grads"] = .object(grads)
            }
            if accumulate { accumulateGradients(parameterGrads, module: module.name) }
            // `keep`: the tape stays for another backward (autograd's retain_graph) until
            // `tapes.release`.
            if !keep { pending[id] = nil }
            results.append(.object(result))
        }
        return ["results": .array(results)]
    }

    /// A delta_weight_backward call's `grad_bias`, ∂L/∂(m·Δb): only for modules that adapt the
    /// bias, shaped like their `delta_bias` (-32002 otherwise); nil when not given (zero).
    private func deltaBiasGradient(_ call: Params, module: AdapterModule) throws -> Tensor? {
        guard call.has("grad_bias") else { return nil }
        let path = call.at("grad_bias")
        guard module.algorithm.adaptsBias else {
            throw RPCError.shapeMismatch("\(path) is given, but module \(module.name) has no bias delta (only norm modules on layers with a bias have one)", path: path)
        }
        let gradient = try RPCError.naming(module: module.name, pass: "backward") {
            try transport.read(try call.value("grad_bias"), path: path).tensor
        }
        guard gradient.shape == module.layer.biasShape else {
            throw RPCError.shapeMismatch("\(path) has shape \(gradient.shape), expected \(module.layer.biasShape)", path: path)
        }
        return gradient
    }

    /// `tapes.release`: drops tapes whose backward will not come (ids that are unknown or
    /// already consumed are ignored, so clients may release from finalizers).
    func tapesRelease(_ p: Params) throws -> JSONValue {
        var released = 0
        for (index, value) in try p.array("tapes").enumerated() {
            guard let id = value.intValue else { throw RPCError.invalidParams("tapes[\(index)] must be an integer", path: "tapes[\(index)]") }
            if pending.removeValue(forKey: Int64(id)) != nil { released += 1 }
        }
        return ["released": JSONValue(released), "pending": JSONValue(pending.count)]
    }

    func accumulateGradients(_ grads: ParameterSet, module: String) {
        var buffer = gradients[module] ?? ParameterSet()
        for (name, tensor) in grads.entries {
            if var existing = buffer[name] {
                existing.add(tensor)
                buffer[name] = existing
            } else {
                buffer[name] = tensor
            }
        }
        gradients[module] = buffer
    }
}
