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
        var prepared: [(call: PreparedForward, outputPath: String)] = []
        for call in calls {
            let name = try call.string("module")
            guard let module = network[name] else { throw RPCError.unknownModule(name) }
            let (x, dtype) = try RPCError.naming(module: name, pass: "forward") {
                try transport.read(try call.value("input"), path: call.at("input"))
            }
            let destination = try TensorTransport.destination(call.object["output"], path: call.at("output"), defaultDType: dtype)
            let elementwise = try call.bool("elementwise", default: false)
            let layerInput = elementwise ? try elementwiseLayerInput(call, module: module, baseOutput: x.shape) : nil
            prepared.append((try prepareForward(module: module, x: x, full: try call.bool("full", default: false),
                                                elementwise: elementwise, layerInput: layerInput,
                                                destination: destination, at: call.at), call.at("output")))
        }
        let keepTapes = try p.bool("grad", default: network.modules.first?.isTraining ?? false)
        if keepTapes { try reserveTapes(prepared.count) }
        let work = prepared.reduce(0) { $0 + $1.call.multiplyAdds }
        var results: [JSONValue] = []
        try CallThreads.run(multiplyAdds: work) {
            for (call, outputPath) in prepared {
                let (output, tape) = try runForward(call, keepTape: keepTapes, outputPath: outputPath)
                var result: JSONObject = ["module": .string(call.module.name), "output": output]
                if let tape { result["tape"] = .integer(tape) }
                results.append(.object(result))
            }
        }
        return ["results": .array(results)]
    }

    /// One forward call, checked and ready to compute.
    struct PreparedForward {
        let module: AdapterModule
        let x: Tensor
        /// DoRA's elementwise transfer (side output_with_input): the layer's input, beside the
        /// base output `x`.
        let layerInput: Tensor?
        let kind: PendingCall.Kind
        let destination: TensorTransport.Destination

        /// The adapter math of this call, for ``CallThreads/run(multiplyAdds:_:)``.
        var multiplyAdds: Int {
            CallThreads.forwardMultiplyAdds(module, inputShape: x.shape, elementwise: kind == .elementwise, layerInputShape: layerInput?.shape)
        }
    }

    /// Checks one forward call of `module` on input `x` (the flags, the input's shape, the
    /// layer input an output_with_input module needs, the base weight for `full`, and that the
    /// output fits `destination`); `at` names a parameter in errors.
    func prepareForward(module: AdapterModule, x: Tensor, full: Bool, elementwise: Bool, layerInput: Tensor? = nil,
                        destination: TensorTransport.Destination, at: (String) -> String) throws -> PreparedForward {
        if full && elementwise {
            throw RPCError.invalidParams("\(at("full")) and \(at("elementwise")) exclude each other", path: at("elementwise"))
        }
        if elementwise {
            if module.elementwiseSide == nil {
                throw RPCError.state("\(module.name) has no elementwise transfer (only ia3 without dropout and rank_dropout has one)")
            }
            if let problem = module.elementwiseProblem(x.shape) { throw RPCError.shapeMismatch(problem, path: at("input")) }
            if module.elementwiseSide == .outputWithInput && layerInput == nil {
                throw RPCError.invalidParams("\(module.name) takes its elementwise transfer with the layer input: \(at("layer_input")) is required (a JSON forward call; call records have no such field)", path: at("layer_input"))
            }
        } else if let problem = module.layer.inputProblem(x.shape) {
            throw RPCError.shapeMismatch(problem, path: at("input"))
        }
        if full && module.baseWeight == nil {
            throw RPCError.state("\(module.name) has no base weight, so \"full\" output is not available (send layers[].weight at network.create)")
        }
        let count = elementwise ? x.count : module.layer.outputShape(forInput: x.shape).product
        try transport.validate(destination, count: count, path: at("output"))
        return PreparedForward(module: module, x: x, layerInput: layerInput, kind: elementwise ? .elementwise : full ? .full : .delta,
                               destination: destination)
    }

    /// Computes a prepared forward call and writes its output; the output's descriptor, and
    /// the tape id when `keepTape` (the caller reserved it).
    func runForward(_ call: PreparedForward, keepTape: Bool, outputPath: String) throws -> (output: JSONValue, tape: Int64?) {
        let module = call.module
        let tape = module.makeTape(inputShape: call.layerInput?.shape ?? call.x.shape, random: &random)
        // What the backward reads: the tensor sent, or what DoRA's factor path saved.
        var saved = call.x
        let y: Tensor
        switch call.kind {
        case .full: y = try module.forward(call.x, tape: tape)
        case .elementwise:
            if let layerInput = call.layerInput {
                (y, saved) = try module.forwardElementwise(call.x, layerInput: layerInput, tape: tape)
            } else {
                y = try module.forwardElementwise(call.x, tape: tape)
            }
        case .delta, .deltaWeight: y = try module.forwardDelta(call.x, tape: tape)
        }
        let output = try transport.write(y, to: call.destination, path: outputPath)
        guard keepTape else { return (output, nil) }
        return (output, store(PendingCall(module: module.name, input: saved, layerInput: call.layerInput, tape: tape, kind: call.kind)))
    }

    /// The `layer_input` of an elementwise JSON call, read and checked against the base output's
    /// shape `baseOutput`; nil when absent (``prepareForward(module:x:full:elementwise:layerInput:destination:at:)``
    /// requires it of output_with_input modules, DoRA, and refuses modules without an elementwise
    /// transfer); refused for modules whose transfer has another side.
    private func elementwiseLayerInput(_ call: Params, module: AdapterModule, baseOutput: [Int]) throws -> Tensor? {
        let path = call.at("layer_input")
        // Absent, or a module without an elementwise transfer: prepareForward says what is wrong.
        guard call.has("layer_input"), module.elementwiseSide != nil else { return nil }
        guard module.elementwiseSide == .outputWithInput else {
            throw RPCError.invalidParams("\(path) is only for modules whose elementwise side is output_with_input", path: path)
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
        _ = try requireNetwork()
        let expectDeltaWeight = gradientKey == "grad"
        let returnGrads = try p.bool("return_parameter_grads", default: false)
        let accumulate = try p.bool("accumulate", default: true)
        var prepared: [PreparedBackward] = []
        var seen = Set<Int64>()
        for call in try p.objects("calls") {
            let id = Int64(try call.int("tape"))
            let (record, module) = try backwardTarget(id, seen: seen, expectDeltaWeight: expectDeltaWeight)
            let (gradient, dtype) = try RPCError.naming(module: module.name, pass: "backward") {
                try transport.read(try call.value(gradientKey), path: call.at(gradientKey))
            }
            try checkBackwardGradient(gradient, record: record, module: module, path: call.at(gradientKey))
            let biasGradient = expectDeltaWeight ? try deltaBiasGradient(call, module: module) : nil
            // Every output destination is checked now, so no call fails after another has
            // consumed its tape or accumulated its gradients.
            let inputDestination = try TensorTransport.destination(call.object["grad_input"], path: call.at("grad_input"), defaultDType: dtype)
            if record.kind != .deltaWeight {
                try transport.validate(inputDestination, count: record.input.count, path: call.at("grad_input"))
            }
            // DoRA's factor path returns ∂x of the layer input too.
            var layerInputOutput: LayerInputOutput?
            if let layerInput = record.layerInput {
                let path = call.at("grad_layer_input")
                let destination = try TensorTransport.destination(call.object["grad_layer_input"], path: path, defaultDType: dtype)
                try transport.validate(destination, count: layerInput.count, path: path)
                layerInputOutput = LayerInputOutput(destination: destination, path: path)
            }
            var parameterOutputs: [ParameterOutput] = []
            if returnGrads {
                let outputs = call.has("parameter_grads") ? try call.object("parameter_grads") : try Params(nil, path: call.at("parameter_grads"))
                parameterOutputs = try self.parameterOutputs(module) { key, _ in
                    (try TensorTransport.destination(outputs.object[key], path: outputs.at(key), defaultDType: .f32), outputs.at(key))
                }
            }
            seen.insert(id)
            prepared.append(PreparedBackward(id: id, record: record, module: module, gradient: gradient, biasGradient: biasGradient,
                                             inputDestination: inputDestination, inputPath: call.at("grad_input"),
                                             layerInputOutput: layerInputOutput, parameterOutputs: returnGrads ? parameterOutputs : nil,
                                             keep: try call.bool("keep", default: false)))
        }
        let work = prepared.reduce(0) { $0 + $1.multiplyAdds }
        var results: [JSONValue] = []
        try CallThreads.run(multiplyAdds: work) {
            for call in prepared {
                results.append(.object(try runBackward(call, accumulate: accumulate)))
            }
        }
        return ["results": .array(results)]
    }

    /// One backward call, checked and ready to compute.
    struct PreparedBackward {
        let id: Int64
        let record: PendingCall
        let module: AdapterModule
        let gradient: Tensor
        let biasGradient: Tensor?
        let inputDestination: TensorTransport.Destination
        let inputPath: String
        /// Where ∂(layer input) goes, for a tape of DoRA's elementwise transfer; nil otherwise.
        let layerInputOutput: LayerInputOutput?
        /// Where each parameter gradient goes, in the module's parameter order; nil: not returned.
        let parameterOutputs: [ParameterOutput]?
        let keep: Bool

        /// The adapter math of this call (about twice its forward's), for
        /// ``CallThreads/run(multiplyAdds:_:)``; a ΔW tape's (`delta_weight_backward`) keeps the
        /// server's threads: its work is not a pass over x.
        var multiplyAdds: Int {
            guard record.kind != .deltaWeight else { return CallThreads.oneThreadBelow }
            return 2 * CallThreads.forwardMultiplyAdds(module, inputShape: record.input.shape, elementwise: record.kind == .elementwise,
                                                       layerInputShape: record.layerInput?.shape)
        }
    }

    /// Where a backward writes ∂(layer input) (`grad_layer_input`), and its parameter path.
    struct LayerInputOutput {
        let destination: TensorTransport.Destination
        let path: String
    }

    /// A parameter gradient's key (`module.parameter`), destination and parameter path.
    typealias ParameterOutput = (key: String, destination: TensorTransport.Destination, path: String)

    /// The forward call kept under tape `id` and its module, for a backward of the matching
    /// kind (`delta_weight_backward` for ΔW tapes); a tape in `seen` counts as unknown.
    func backwardTarget(_ id: Int64, seen: Set<Int64>, expectDeltaWeight: Bool) throws -> (PendingCall, AdapterModule) {
        guard let record = pending[id], !seen.contains(id) else { throw RPCError.unknownModule(String(id), kind: "tape") }
        guard (record.kind == .deltaWeight) == expectDeltaWeight else {
            throw RPCError.state("tape \(id) belongs to \(record.kind == .deltaWeight ? "delta_weight" : "forward"); use \(record.kind == .deltaWeight ? "delta_weight_backward" : "backward")")
        }
        guard let module = try requireNetwork()[record.module] else { throw RPCError.unknownModule(record.module) }
        return (record, module)
    }

    /// Checks that a backward's incoming gradient has the shape of what its forward returned.
    func checkBackwardGradient(_ gradient: Tensor, record: PendingCall, module: AdapterModule, path: String) throws {
        let expected = switch record.kind {
        case .deltaWeight: module.layer.weightShape
        case .elementwise: record.input.shape
        case .delta, .full: module.layer.outputShape(forInput: record.input.shape)
        }
        guard gradient.shape == expected else {
            throw RPCError.shapeMismatch("\(path) has shape \(gradient.shape), expected \(expected)", path: path)
        }
    }

    /// Each of `module`'s parameters with the destination `output(key, index)` gives it,
    /// checked to fit that parameter's gradient.
    func parameterOutputs(_ module: AdapterModule,
                          _ output: (_ key: String, _ index: Int) throws -> (TensorTransport.Destination, String)) throws -> [ParameterOutput] {
        try module.algorithm.parameters.entries.enumerated().map { index, entry in
            let key = "\(module.name).\(entry.name)"
            let (destination, path) = try output(key, index)
            try transport.validate(destination, count: entry.tensor.count, path: path)
            return (key, destination, path)
        }
    }

    /// Computes a prepared backward call: writes ∂x and the parameter gradients, accumulates
    /// those (with `accumulate`), consumes the tape unless `keep`; the result object.
    func runBackward(_ call: PreparedBackward, accumulate: Bool) throws -> JSONObject {
        let (record, module) = (call.record, call.module)
        var result: JSONObject = [:]
        let parameterGrads: ParameterSet
        switch record.kind {
        case .deltaWeight:
            parameterGrads = try module.effectiveDeltaWeightBackward(call.gradient, biasGradient: call.biasGradient, record.tape)
        case .elementwise where record.layerInput != nil:
            guard let layerInput = record.layerInput, let layerInputOutput = call.layerInputOutput else {
                throw RPCError.invalidParams("tape \(call.id) is a forward with layer_input: its backward returns grad_layer_input, which only a JSON backward call names", path: call.inputPath)
            }
            let grads = try module.backwardElementwise(saved: record.input, layerInput: layerInput, gradOutput: call.gradient, tape: record.tape)
            parameterGrads = grads.parameters
            result["grad_input"] = try transport.write(grads.input, to: call.inputDestination, path: call.inputPath)
            result["grad_layer_input"] = try transport.write(grads.layerInput, to: layerInputOutput.destination, path: layerInputOutput.path)
        case .delta, .full, .elementwise:
            let grads = switch record.kind {
            case .full: try module.backward(record.input, gradOutput: call.gradient, tape: record.tape)
            case .elementwise: try module.backwardElementwise(record.input, gradOutput: call.gradient, tape: record.tape)
            case .delta, .deltaWeight: try module.backwardDelta(record.input, gradOutput: call.gradient, tape: record.tape)
            }
            parameterGrads = grads.parameters
            result["grad_input"] = try transport.write(grads.input, to: call.inputDestination, path: call.inputPath)
        }
        if let outputs = call.parameterOutputs {
            var grads = JSONObject()
            for (name, tensor) in parameterGrads.entries {
                let key = "\(module.name).\(name)"
                let output = outputs.first { $0.key == key }
                grads[key] = try transport.write(tensor, to: output?.destination ?? .inline(.f32), path: output?.path ?? key)
            }
            result["parameter_grads"] = .object(grads)
        }
        if accumulate { accumulateGradients(parameterGrads, module: module.name) }
        // `keep`: the tape stays for another backward (autograd's retain_graph) until
        // `tapes.release`.
        if !call.keep { pending[call.id] = nil }
        return result
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
