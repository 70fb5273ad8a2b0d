import LycorisAlgorithms
import LycorisCUDA
import LycorisDevice
import LycorisRPC

/// A device network's state (protocol/README.md §9.7): where it computes, the handles it has
/// open, and the client's buffers it is bound to. The client (torch) owns every buffer; the
/// server holds addresses into them and a device workspace inside ``DeviceAdapterMath``.
///
///     network.bind                      parameters[module][suffix], gradients[module][suffix]
///     network.delta_weights             m·ΔW(parameters) → outputs[module] (m·Δb → bias_outputs[module])
///     network.delta_weights_backward    ∂(m·ΔW)[module] (∂(m·Δb)) → gradients[module][suffix] (overwritten)
///
/// Every call synchronizes the device before the server answers (the stream rule).
final class DeviceSession {
    /// A bound or referenced buffer: its device tensor and the handle it came through (so
    /// releasing a handle drops the bindings that use it).
    struct Buffer {
        let tensor: DeviceTensor
        let handle: IPCHandle
    }

    /// `cuda:N` or `emulated`.
    let name: String
    let resolver: any DeviceAddressResolver
    let math: DeviceAdapterMath
    /// By module, then parameter suffix; empty until `network.bind`.
    private(set) var parameters: [String: [String: Buffer]] = [:]
    private(set) var gradients: [String: [String: Buffer]] = [:]
    private(set) var baseWeights: [String: Buffer] = [:]

    init(name: String, resolver: any DeviceAddressResolver, math: DeviceAdapterMath) {
        self.name = name
        self.resolver = resolver
        self.math = math
    }

    var isBound: Bool { !parameters.isEmpty }

    /// Why `module` cannot take the device path, or nil.
    static func refusal(_ module: AdapterModule) -> String? {
        if module.options.dropout > 0 || module.options.rankDropout > 0 || module.options.moduleDropout > 0 {
            return "dropout, rank_dropout and module_dropout draw random choices per step, which the batched device path does not carry"
        }
        if module.algorithm is DyLoRA {
            return "dylora draws a random rank block per training step, which the batched device path does not carry"
        }
        do {
            try DeviceAdapterMath.checkComputes(module)
        } catch {
            return error.message
        }
        return nil
    }

    /// The device tensor `reference` names, opening its handle on first use; -32009 when the
    /// handle cannot be opened or the range lies outside its allocation.
    func resolve(_ reference: DeviceReference, path: String) throws -> Buffer {
        do {
            let address = try resolver.address(of: reference.handle, offset: reference.offset, bytes: reference.count * 4)
            return Buffer(tensor: DeviceTensor(address: address, shape: reference.shape), handle: reference.handle)
        } catch {
            throw RPCError.device("\(path): \(error)", path: path)
        }
    }

    func bind(parameters: [String: [String: Buffer]], gradients: [String: [String: Buffer]], baseWeights: [String: Buffer]) {
        self.parameters = parameters
        self.gradients = gradients
        self.baseWeights = baseWeights
    }

    /// Drops the binding (every module's: the client binds the network as a whole).
    func unbind() {
        parameters = [:]
        gradients = [:]
        baseWeights = [:]
    }

    /// Closes `handles`; a binding that used one is dropped. Returns how many were open.
    func release(_ handles: [IPCHandle]) throws -> Int {
        let open = resolver.openCount
        let released = Set(handles)
        let uses = parameters.values.flatMap(\.values) + gradients.values.flatMap(\.values) + Array(baseWeights.values)
        if uses.contains(where: { released.contains($0.handle) }) { unbind() }
        for handle in handles {
            do { try resolver.release(handle) } catch { throw RPCError.device("device.release: \(error)", path: "handles") }
        }
        return open - resolver.openCount
    }

    /// Closes every handle (shutdown, end of stdin).
    func close() {
        unbind()
        try? resolver.releaseAll()
    }
}
