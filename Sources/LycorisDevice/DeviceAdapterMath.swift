import LycorisAlgorithms
import LycorisCUDA

/// The weight path of one adapter module on a device — what the server computes for a
/// network on `cuda:N`, where torch runs every adapted layer with W0 + m·ΔW itself:
///
///     deltaWeight:          output ← m·ΔW (the base weight's shape); bias ← m·Δb where the
///                           algorithm adapts the bias (Full's diff_b, Norm's b_norm)
///     deltaWeightBackward:  gradients[suffix] ← ∂L/∂parameter, from gradient = ∂L/∂(m·ΔW)
///                           (and biasGradient = ∂L/∂(m·Δb)); overwritten, not accumulated
///
/// `parameters` are the module's trainable tensors by saved key suffix (`lora_up.weight`,
/// `lora_down.weight`, `lora_mid.weight`, `hada_w1_a`, `lokr_w1`, `weight`, `diff`, `w_norm`,
/// `scalar`, …: the names of ``AdapterModule/algorithm``'s ``AdapterAlgorithm/parameters``),
/// read in place in device memory, each with exactly the module's shape; `gradients` has the
/// same names. `baseWeight` is W0 where the algorithm reads it (IA3, GLoRA). `block` is
/// DyLoRA's rank block of the step (nil: all blocks, as in eval). `rowMask` (out,) is
/// rebuild-mode rank dropout on ΔW's rows (and Δb), as
/// ``AdapterModule/effectiveDeltaWeight(_:)`` applies it; nil: none. The math is the host
/// engine's own — the generic weight-path functions of LoCon, LoHa, LoKr, DyLoRA and GLoRA
/// over ``DeviceAlgebra`` — and, for the one-kernel algorithms, IA3 (W0 scaled per channel),
/// Full (diff) and Norm (w_norm, b_norm), a kernel each here.
///
/// Computes: LoRA/LoCon (linear, convolutions as a reshaped GEMM, Tucker `lora_mid`,
/// use_scalar), LoHa (+Tucker), LoKr (every factor form, Tucker), DyLoRA, GLoRA, IA3, Full,
/// Norm. Every other algorithm (DoRA, Diag-OFT, BOFT, T-LoRA) is refused by
/// ``checkComputes(_:)`` with a ``DeviceError`` naming it.
///
/// Work is queued on the runtime's stream; ``synchronize()`` waits for it (the server calls
/// it before replying). Temporaries live in one workspace reused by every call (one call's
/// working set). Not thread-safe: one call at a time.
///
/// NOT YET RUN ON A GPU: tested on ``EmulatedDevice`` against the host engine; the same
/// comparison on ``CUDADevice`` is ``DeviceSelfCheck``, run by scripts/gpu-check.sh.
public final class DeviceAdapterMath: @unchecked Sendable {
    public let runtime: DeviceRuntime
    private let workspace: DeviceWorkspace

    public init(runtime: DeviceRuntime) {
        self.runtime = runtime
        workspace = DeviceWorkspace(runtime: runtime)
    }

    /// Bytes of device memory this object holds between calls (its workspace).
    public var workspaceBytes: Int { workspace.bytes }

    /// Throws a ``DeviceError`` ("`dora` does not compute on CUDA yet; use device \"cpu\"")
    /// unless ``deltaWeight(of:parameters:multiplier:baseWeight:block:rowMask:into:bias:)``
    /// computes `module`'s algorithm.
    public static func checkComputes(_ module: AdapterModule) throws(DeviceError) { _ = try port(module) }

    private static func port(_ module: AdapterModule) throws(DeviceError) -> Port {
        guard let port = Port(module.algorithm) else {
            throw DeviceError("`\(Self.algorithmName(module.algorithm))` does not compute on CUDA yet; use device \"cpu\"")
        }
        return port
    }

    /// m·ΔW of `module` into `output` (the base weight's shape), and m·Δb into `bias` where the
    /// algorithm adapts the bias (then required; otherwise it must be nil).
    public func deltaWeight(of module: AdapterModule, parameters: [String: DeviceTensor], multiplier: Float,
                            baseWeight: DeviceTensor?, block: Int? = nil, rowMask: DeviceTensor? = nil,
                            into output: DeviceTensor, bias: DeviceTensor? = nil) throws {
        let port = try Self.port(module)
        try check(module, parameters: parameters, baseWeight: baseWeight, rowMask: rowMask)
        try expect(output, module.layer.weightShape, "\(module.name): the ΔW output")
        try checkBias(module, bias, "the Δb output")
        defer { try? workspace.reset() }
        let algebra = DeviceAlgebra(workspace: workspace)
        let p = Factors(parameters)
        let m = multiplier
        switch port {
        case let .locon(a): try finish(algebra, a.deltaWeight(algebra, p, multiplier: m), into: output, rowMask: rowMask)
        case let .loha(a): try finish(algebra, a.deltaWeight(algebra, p, multiplier: m), into: output, rowMask: rowMask)
        case let .lokr(a): try finish(algebra, a.deltaWeight(algebra, p, multiplier: m), into: output, rowMask: rowMask)
        case let .dylora(a):
            let b = try a.block(block)
            try finish(algebra, a.deltaWeight(algebra, p, block: b, multiplier: m), into: output, rowMask: rowMask)
        case let .glora(a):
            try finish(algebra, a.deltaWeight(algebra, p, baseWeight: baseWeight!, multiplier: m), into: output, rowMask: rowMask)
        case let .ia3(a):
            // m·ΔW = W0 ⊙ (m·w) along rows (output channels) or columns (train_on_input).
            let axis = IA3Axis(a, module.layer)
            let scaled = rowMask == nil ? output : DeviceTensor(address: try workspace.buffer(output.count), shape: output.shape)
            try runtime.launch(.channelScale(out: scaled.address, x: baseWeight!.address, w: parameters["weight"]!.address,
                                             offset: 0, s: m, stride: axis.stride, channels: axis.channels, count: output.count))
            try finish(algebra, scaled, into: output, rowMask: rowMask)
        case .full:
            try finish(algebra, algebra.scaled(parameters["diff"]!, by: m), into: output, rowMask: rowMask)
            if let bias { try finish(algebra, algebra.scaled(parameters["diff_b"]!, by: m), into: bias, rowMask: rowMask) }
        case .norm:
            try finish(algebra, algebra.scaled(parameters["w_norm"]!, by: m), into: output, rowMask: rowMask)
            if let bias { try finish(algebra, algebra.scaled(parameters["b_norm"]!, by: m), into: bias, rowMask: rowMask) }
        }
    }

    /// ∂L/∂parameters of `module` into `gradients` (every parameter's name, overwritten) from
    /// `gradient` = ∂L/∂(m·ΔW) and `biasGradient` = ∂L/∂(m·Δb) (algorithms that adapt the bias;
    /// nil: zero).
    public func deltaWeightBackward(of module: AdapterModule, parameters: [String: DeviceTensor], multiplier: Float,
                                    baseWeight: DeviceTensor?, block: Int? = nil, rowMask: DeviceTensor? = nil,
                                    gradient: DeviceTensor, biasGradient: DeviceTensor? = nil,
                                    into gradients: [String: DeviceTensor]) throws {
        let port = try Self.port(module)
        try check(module, parameters: parameters, baseWeight: baseWeight, rowMask: rowMask)
        try expect(gradient, module.layer.weightShape, "\(module.name): ∂ΔW")
        if let biasGradient { try checkBias(module, biasGradient, "∂Δb") }
        try checkNames(module, gradients, "gradients")
        defer { try? workspace.reset() }
        let algebra = DeviceAlgebra(workspace: workspace)
        let p = Factors(parameters)
        let m = multiplier
        let g = try masked(algebra, gradient, rowMask)
        let gBias = try biasGradient.map { try masked(algebra, $0, rowMask) }
        var results: [(String, DeviceTensor)]
        switch port {
        case let .locon(a): results = a.deltaWeightBackward(algebra, p, gradient: g, multiplier: m)
        case let .loha(a): results = a.deltaWeightBackward(algebra, p, gradient: g, multiplier: m)
        case let .lokr(a): results = a.deltaWeightBackward(algebra, p, gradient: g, multiplier: m)
        case let .dylora(a): results = a.deltaWeightBackward(algebra, p, gradient: g, block: try a.block(block), multiplier: m)
        case let .glora(a): results = a.deltaWeightBackward(algebra, p, baseWeight: baseWeight!, gradient: g, multiplier: m)
        case let .ia3(a):
            // ∂w = m · Σ ∂(m·ΔW) ⊙ W0 over every axis but w's.
            let axis = IA3Axis(a, module.layer)
            let weight = gradients["weight"]!
            try algebra.channelDot(into: weight, g, baseWeight!, scale: m, stride: axis.stride, channels: axis.channels)
            results = []
        case .full:
            results = [("diff", algebra.scaled(g, by: m))]
            if let diffBias = gradients["diff_b"] { results.append(("diff_b", try biasTerm(algebra, gBias, module, m, diffBias.count))) }
        case .norm:
            results = [("w_norm", algebra.scaled(g, by: m)),
                       ("b_norm", try biasTerm(algebra, gBias, module, m, gradients["b_norm"]!.count))]
        }
        try algebra.check()
        for (name, value) in results { try copy(value, into: gradients[name]!) }
    }

    /// Waits until every queued operation is done.
    public func synchronize() throws { try runtime.synchronize() }

    // MARK: Algorithms

    /// The algorithms computed on a device, each with its host module.
    enum Port {
        case locon(LoCon), loha(LoHa), lokr(LoKr), dylora(DyLoRA), glora(GLoRA), ia3(IA3), full(Full), norm(Norm)

        init?(_ algorithm: any AdapterAlgorithm) {
            switch algorithm {
            case let a as LoCon: self = .locon(a)
            case let a as LoHa: self = .loha(a)
            case let a as LoKr: self = .lokr(a)
            case let a as DyLoRA: self = .dylora(a)
            case let a as GLoRA: self = .glora(a)
            case let a as IA3: self = .ia3(a)
            case let a as Full: self = .full(a)
            case let a as Norm: self = .norm(a)
            default: return nil
            }
        }
    }

    /// `locon`, `loha`, …, or `<base>+dora` for DoRA around one (whose magnitude is `dora_scale`).
    static func algorithmName(_ algorithm: any AdapterAlgorithm) -> String {
        let name = type(of: algorithm).algorithm.rawValue
        return algorithm.parameters["dora_scale"] != nil ? name + "+dora" : name
    }

    /// IA3's w runs along W0's rows (stride Π later axes) or, on input, its columns (stride K).
    struct IA3Axis {
        let stride: Int, channels: Int
        init(_ ia3: IA3, _ layer: LayerSpec) {
            let shape = layer.weightShape
            if ia3.onInput {
                (stride, channels) = (shape.dropFirst(2).reduce(1, *), shape[1])
            } else {
                (stride, channels) = (shape.dropFirst().reduce(1, *), shape[0])
            }
        }
    }

    // MARK: Steps

    /// `value` written to `destination`, its rows masked by `rowMask` when given; throws the
    /// algebra's failure first.
    private func finish(_ algebra: DeviceAlgebra, _ value: DeviceTensor, into destination: DeviceTensor,
                        rowMask: DeviceTensor?) throws {
        try algebra.check()
        guard let rowMask else { return try copy(value, into: destination) }
        try runtime.launch(.channelScale(out: destination.address, x: value.address, w: rowMask.address, offset: 0, s: 1,
                                         stride: value.count / rowMask.count, channels: rowMask.count, count: value.count))
    }

    /// `value` with rows masked, or itself.
    private func masked(_ algebra: DeviceAlgebra, _ value: DeviceTensor, _ rowMask: DeviceTensor?) throws -> DeviceTensor {
        guard let rowMask else { return value }
        let out = DeviceTensor(address: try workspace.buffer(value.count), shape: value.shape)
        try runtime.launch(.channelScale(out: out.address, x: value.address, w: rowMask.address, offset: 0, s: 1,
                                         stride: value.count / rowMask.count, channels: rowMask.count, count: value.count))
        return out
    }

    /// m·∂Δb, or `count` zeros where the module does not adapt the bias or no bias gradient came.
    private func biasTerm(_ algebra: DeviceAlgebra, _ gBias: DeviceTensor?, _ module: AdapterModule, _ m: Float,
                          _ count: Int) throws -> DeviceTensor {
        if module.algorithm.adaptsBias, let gBias { return algebra.scaled(gBias, by: m) }
        let zeros = DeviceTensor(address: try workspace.buffer(count), shape: [count])
        try runtime.fillZero(zeros.address, count: count)
        return zeros
    }

    private func copy(_ value: DeviceTensor, into destination: DeviceTensor) throws {
        guard value.address != destination.address else { return }
        try runtime.copy(value.count, from: value.address, to: destination.address)
    }

    // MARK: Checks

    private func check(_ module: AdapterModule, parameters: [String: DeviceTensor], baseWeight: DeviceTensor?,
                       rowMask: DeviceTensor?) throws {
        try checkNames(module, parameters, "parameters")
        if module.algorithm is IA3 || module.algorithm is GLoRA {
            guard let baseWeight else {
                throw AdapterError("\(module.name): \(Self.algorithmName(module.algorithm)) needs the base layer's weight")
            }
            try expect(baseWeight, module.layer.weightShape, "\(module.name): the base weight")
        }
        if let rowMask { try expect(rowMask, [module.layer.outFeatures], "\(module.name): the rank-dropout row mask") }
    }

    /// `tensors` names exactly the module's parameters, each with its shape.
    private func checkNames(_ module: AdapterModule, _ tensors: [String: DeviceTensor], _ what: String) throws {
        let entries = module.algorithm.parameters.entries
        for (name, tensor) in entries {
            guard let given = tensors[name] else {
                throw AdapterError("\(module.name): \(what) lack \(name) (expected \(entries.map(\.name).joined(separator: ", ")))")
            }
            try expect(given, tensor.shape, "\(module.name): \(what) \(name)")
        }
        if let extra = tensors.keys.sorted().first(where: { name in !entries.contains { $0.name == name } }) {
            throw AdapterError("\(module.name): \(what) name \(extra), which is not a parameter of this \(Self.algorithmName(module.algorithm)) module")
        }
    }

    /// The Δb buffer: required (Δb's shape) where the algorithm adapts the bias, refused otherwise.
    private func checkBias(_ module: AdapterModule, _ bias: DeviceTensor?, _ what: String) throws {
        if module.algorithm.adaptsBias {
            guard let bias else { throw AdapterError("\(module.name): \(what) is required (this module adapts the bias)") }
            try expect(bias, module.layer.biasShape, "\(module.name): \(what)")
        } else if bias != nil {
            throw AdapterError("\(module.name): \(what) given, but this module does not adapt the bias")
        }
    }

    private func expect(_ tensor: DeviceTensor, _ shape: [Int], _ what: String) throws {
        guard tensor.shape == shape else { throw AdapterError("\(what) has shape \(tensor.shape), expected \(shape)") }
        guard tensor.address != 0 else { throw AdapterError("\(what) has a null address") }
    }
}
