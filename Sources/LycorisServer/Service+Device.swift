import LycorisAlgorithms
import LycorisCUDA
import LycorisDevice
import LycorisRPC

/// Device networks (protocol/README.md §9.7): `network.bind`, `network.delta_weights`,
/// `network.delta_weights_backward` and `device.release`, on the device session
/// `network.create {device}` or `network.bind {device}` opened.
extension LycorisService {
    /// The session for `device` (`cuda:N` or `emulated`), every module of `network` checked;
    /// nil for `cpu`. -32009 when the server cannot compute there.
    func openDeviceSession(_ device: String, network: Network) throws -> DeviceSession? {
        let session: DeviceSession
        if device == "emulated" {
            guard emulatedDeviceEnabled else {
                throw RPCError.device("\"emulated\" is a test device: start the server with LYCORIS_EMULATED_DEVICE=1", path: "device")
            }
            session = DeviceSession(name: device, resolver: IPCHandleCache(memory: EmulatedIPCMemory(directory: arenaDirectory)),
                                    math: DeviceAdapterMath(runtime: EmulatedDevice()))
        } else {
            let chosen = try checkedDevice(device)
            guard case .cuda = chosen, let cuda, case let .success(driver) = cuda.driver else { return nil }
            // The math first: creating its runtime makes the device's primary context current,
            // which the IPC calls act in.
            let math = try cudaMath(chosen)
            do {
                session = DeviceSession(name: chosen.description, resolver: IPCHandleCache(memory: try DriverIPCMemory(driver: driver)),
                                        math: math)
            } catch {
                throw RPCError.device("\(chosen): CUDA IPC is not available: \(error)", path: "device")
            }
        }
        try Self.checkModules(network, on: session.name)
        return session
    }

    /// -32009 naming the first module of `network` the device does not compute.
    static func checkModules(_ network: Network, on device: String) throws {
        for module in network.modules {
            if let reason = DeviceSession.refusal(module) {
                throw RPCError.device("\(device): module \(module.name) does not compute on the device: \(reason); use device \"cpu\"", path: "device")
            }
        }
    }

    /// `network.bind`: the client's parameter and gradient buffers (and base weights), by
    /// device reference; replaces any earlier binding.
    func networkBind(_ p: Params) throws -> JSONValue {
        let network = try requireNetwork()
        var opened = deviceSession
        if p.has("device") {
            let device = try p.string("device")
            if let session = deviceSession {
                guard device == session.name else {
                    throw RPCError.device("the network computes on \(session.name), not \(device)", path: "device")
                }
            } else {
                opened = try openDeviceSession(device, network: network)
            }
        }
        guard let session = opened else {
            throw RPCError.state("the network computes on the cpu: name a device in network.create or network.bind")
        }
        try Self.checkModules(network, on: session.name)
        let parameterRefs = try Self.references(p.object("parameters"))
        let gradientRefs = try Self.references(p.object("gradients"))
        let baseRefs = p.has("base_weights") ? try Self.references(p.object("base_weights")) : [:]
        var parameters: [String: [String: DeviceSession.Buffer]] = [:]
        var gradients: [String: [String: DeviceSession.Buffer]] = [:]
        var baseWeights: [String: DeviceSession.Buffer] = [:]
        var expected = Set<String>()
        for module in network.modules {
            for (suffix, tensor) in module.algorithm.parameters.entries {
                let key = "\(module.name).\(suffix)"
                expected.insert(key)
                parameters[module.name, default: [:]][suffix] = try Self.buffer(parameterRefs, "parameters", key, tensor.shape, session)
                gradients[module.name, default: [:]][suffix] = try Self.buffer(gradientRefs, "gradients", key, tensor.shape, session)
            }
            if let (reference, path) = baseRefs[module.name] {
                guard reference.shape == module.layer.weightShape else {
                    throw RPCError.shapeMismatch("\(path) has shape \(reference.shape), the layer's weight has \(module.layer.weightShape)", path: path)
                }
                baseWeights[module.name] = try session.resolve(reference, path: path)
            }
        }
        for key in Array(parameterRefs.keys) + Array(gradientRefs.keys) where !expected.contains(key) {
            throw RPCError.unknownModule(key, kind: "parameter")
        }
        for name in baseRefs.keys where network[name] == nil { throw RPCError.unknownModule(name) }
        for module in network.modules where type(of: module.algorithm).algorithm.needsBaseWeight(module.options) && baseWeights[module.name] == nil {
            throw RPCError.invalidParams("missing base_weights.\(module.name): its ΔW reads the layer's weight", path: "base_weights.\(module.name)")
        }
        session.bind(parameters: parameters, gradients: gradients, baseWeights: baseWeights)
        deviceSession = session
        return ["bound": JSONValue(2 * expected.count + baseWeights.count), "open_handles": JSONValue(session.resolver.openCount)]
    }

    /// `network.delta_weights`: m·ΔW of every named module into the client's buffers.
    func networkDeltaWeights(_ p: Params) throws -> JSONValue {
        let (session, calls) = try deviceCalls(p, member: "outputs", biasMember: "bias_outputs")
        try onDevice(session) {
            for (module, buffer, bias) in calls {
                try session.math.deltaWeight(of: module, parameters: session.parameters[module.name]!.mapValues(\.tensor),
                                             multiplier: module.multiplier, baseWeight: session.baseWeights[module.name]?.tensor,
                                             into: buffer.tensor, bias: bias?.tensor)
            }
        }
        return ["modules": JSONValue(calls.count)]
    }

    /// `network.delta_weights_backward`: every named module's ∂parameters from its ∂(m·ΔW),
    /// written over the bound gradient buffers.
    func networkDeltaWeightsBackward(_ p: Params) throws -> JSONValue {
        let (session, calls) = try deviceCalls(p, member: "grads", biasMember: "bias_grads")
        try onDevice(session) {
            for (module, buffer, bias) in calls {
                try session.math.deltaWeightBackward(of: module, parameters: session.parameters[module.name]!.mapValues(\.tensor),
                                                     multiplier: module.multiplier, baseWeight: session.baseWeights[module.name]?.tensor,
                                                     gradient: buffer.tensor, biasGradient: bias?.tensor,
                                                     into: session.gradients[module.name]!.mapValues(\.tensor))
            }
        }
        return ["modules": JSONValue(calls.count)]
    }

    /// `device.release`: closes the mappings of the given handles.
    func deviceRelease(_ p: Params) throws -> JSONValue {
        let handles = try p.strings("handles").enumerated().map { try DeviceReference.handle($1, path: "handles[\($0)]") }
        guard let session = deviceSession else { return ["released": 0, "open_handles": 0] }
        let released = try session.release(handles)
        return ["released": JSONValue(released), "open_handles": JSONValue(session.resolver.openCount)]
    }

    // MARK: Helpers

    /// The bound session and, in network order, each named module with its resolved buffer
    /// (W0's shape) and, for a module that adapts the bias, its bias buffer from `biasMember`
    /// (the bias's shape; required for `bias_outputs`, optional — zero — for `bias_grads`),
    /// all checked before anything is computed.
    private func deviceCalls(_ p: Params, member: String, biasMember: String) throws
        -> (DeviceSession, [(AdapterModule, DeviceSession.Buffer, DeviceSession.Buffer?)]) {
        let network = try requireNetwork()
        guard let session = deviceSession else {
            throw RPCError.state("the network computes on the cpu: name a device in network.create or network.bind")
        }
        guard session.isBound else { throw RPCError.state("nothing is bound on \(session.name): call network.bind first") }
        let references = try Self.references(p.object(member))
        let biasReferences = p.has(biasMember) ? try Self.references(p.object(biasMember)) : [:]
        for name in Array(references.keys) + Array(biasReferences.keys) where network[name] == nil { throw RPCError.unknownModule(name) }
        var calls: [(AdapterModule, DeviceSession.Buffer, DeviceSession.Buffer?)] = []
        for module in network.modules {
            guard let (reference, path) = references[module.name] else { continue }
            guard reference.shape == module.layer.weightShape else {
                throw RPCError.shapeMismatch("\(path) has shape \(reference.shape), the layer's weight has \(module.layer.weightShape)", path: path)
            }
            var bias: DeviceSession.Buffer?
            if let (biasReference, biasPath) = biasReferences[module.name] {
                guard module.algorithm.adaptsBias else {
                    throw RPCError.shapeMismatch("\(biasPath) is given, but module \(module.name) has no bias delta", path: biasPath)
                }
                guard biasReference.shape == module.layer.biasShape else {
                    throw RPCError.shapeMismatch("\(biasPath) has shape \(biasReference.shape), the bias has \(module.layer.biasShape)", path: biasPath)
                }
                bias = try session.resolve(biasReference, path: biasPath)
            } else if module.algorithm.adaptsBias && biasMember == "bias_outputs" {
                throw RPCError.invalidParams("missing \(biasMember).\(module.name): module \(module.name) adapts the bias", path: "\(biasMember).\(module.name)")
            }
            calls.append((module, try session.resolve(reference, path: path), bias))
        }
        return (session, calls)
    }

    /// Runs device work and synchronizes before the answer (the stream rule); a device
    /// failure is -32009, an adapter the device math refuses -32008.
    private func onDevice(_ session: DeviceSession, _ body: () throws -> Void) throws {
        do {
            try body()
            try session.math.synchronize()
        } catch let error as RPCError {
            throw error
        } catch let error as AdapterError {
            throw RPCError.adapter(error.description)
        } catch {
            throw RPCError.device("\(session.name): \(error)", path: "device")
        }
    }

    /// The buffer `references[key]` names, with `shape`; -32602 when it is missing.
    private static func buffer(_ references: [String: (DeviceReference, String)], _ member: String, _ key: String,
                               _ shape: [Int], _ session: DeviceSession) throws -> DeviceSession.Buffer {
        guard let (reference, path) = references[key] else {
            throw RPCError.invalidParams("missing \(member).\(key): every parameter must be bound", path: "\(member).\(key)")
        }
        guard reference.shape == shape else {
            throw RPCError.shapeMismatch("\(path) has shape \(reference.shape), the parameter has \(shape)", path: path)
        }
        return try session.resolve(reference, path: path)
    }

    /// A map of device references by key, each with its path.
    private static func references(_ p: Params) throws -> [String: (DeviceReference, String)] {
        var references: [String: (DeviceReference, String)] = [:]
        for (key, value) in p.object.members {
            references[key] = (try DeviceReference(value, path: p.at(key)), p.at(key))
        }
        return references
    }
}
