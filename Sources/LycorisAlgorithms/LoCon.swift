import LycorisCore

/// LoRA / LoCon (LyCORIS `LoConModule`).
///
/// Shapes (r = rank, K = Π kernel):
/// - Linear: `lora_down.weight` (r, in), `lora_up.weight` (out, r).
/// - Conv (1, 2 or 3 spatial axes, k… the kernel): `lora_down.weight` (r, in/g, k…) with
///   the layer's stride/padding/dilation, `lora_up.weight` (out, r, 1…).
/// - Conv with Tucker (some k ≠ 1): `lora_down.weight` (r, in/g, 1…), `lora_mid.weight`
///   (r, r, k…), `lora_up.weight` (out, r, 1…).
///
/// ΔW = s·σ·up·down (reshaped), or s·σ·Σ_{ij} mid[i,j]·up[:,i]⊗down[j,:] with Tucker;
/// s = α/r (α/√r with rs_lora), σ the optional trainable scalar.
/// Init: down, mid kaiming-uniform(a=√5); up zeros (kaiming with use_scalar, σ = 0).
/// Bypass: Δ(x) = s·σ·up(mid(down(x))), with rank dropout masking the rank axis. (LyCORIS
/// 4.1.3 shapes that mask (1, r, 1, 1) for 4-D activations only; on conv1d/conv3d it puts
/// it on the last spatial axis, which fails unless that extent is r or 1 — and is wrong
/// when it is. This masks the rank axis on every convolution, as LyCORIS does on conv2d.)
public struct LoCon: MultiplierInFactors {
    public static let algorithm = Algorithm.locon
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let scale: Float
    /// The `alpha` written to files (α·r/r_f, see ``ScaleRule``).
    public let savedAlpha: Float
    public let usesTucker: Bool
    public var rank: Int? { parameters.required("lora_down.weight").shape[0] }

    /// A fresh module with LyCORIS's initialisation.
    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        self.layer = layer
        let r = options.rank
        let kernel = layer.kernelSize
        usesTucker = options.useTucker && kernel.contains { $0 != 1 }
        let rule = ScaleRule(alpha: options.alpha, rank: r, rsLoRA: options.rsLoRA)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        let ones = kernel.map { _ in 1 }
        var parameters = ParameterSet()
        let downShape = [r, layer.weightInFeatures] + (usesTucker ? ones : kernel)
        parameters["lora_down.weight"] = .kaimingUniform(downShape, using: &random)
        if usesTucker { parameters["lora_mid.weight"] = .kaimingUniform([r, r] + kernel, using: &random) }
        let upShape = [layer.outFeatures, r] + ones
        parameters["lora_up.weight"] = options.useScalar ? .kaimingUniform(upShape, using: &random) : .zeros(upShape)
        if options.useScalar { parameters["scalar"] = Tensor(scalar: 0) }
        self.parameters = parameters
    }

    /// A module from a file's tensors (`lora_up.weight`, `lora_down.weight`, optional
    /// `lora_mid.weight`); scale = alpha/r. A 2-D `lora_up.weight` on a conv layer (as
    /// LyCORIS's DyLoRA writes it) is accepted as (out, r, 1…).
    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        self.layer = layer
        guard var up = tensors["lora_up.weight"], let down = tensors["lora_down.weight"] else {
            throw AdapterError("locon: lora_up.weight and lora_down.weight are both required")
        }
        let r = down.shape.first ?? 0
        let kernel = layer.kernelSize
        let ones = kernel.map { _ in 1 }
        if up.rank == 2 && layer.isConvolution { up = up.reshaped(up.shape + ones) }
        let mid = tensors["lora_mid.weight"]
        usesTucker = mid != nil
        try Self.expectShape(up, [layer.outFeatures, r] + ones, "lora_up.weight")
        try Self.expectShape(down, [r, layer.weightInFeatures] + (usesTucker ? ones : kernel), "lora_down.weight")
        if let mid { try Self.expectShape(mid, [r, r] + kernel, "lora_mid.weight") }
        let rule = ScaleRule(fileAlpha: alpha, rank: r)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        parameters = ParameterSet([("lora_down.weight", down)] + (mid.map { [("lora_mid.weight", $0)] } ?? []) + [("lora_up.weight", up)])
    }

    private var up: Tensor { parameters.required("lora_up.weight") }
    private var down: Tensor { parameters.required("lora_down.weight") }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient, multiplier: 1))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// α · up·down (or the Tucker rebuild), weight shape.
    private func product<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, alpha: Float) -> A.Value {
        let up = algebra.matrix(p.required("lora_up.weight")), down = algebra.matrix(p.required("lora_down.weight"))
        if let mid = p["lora_mid.weight"] {
            return algebra.reshaped(TuckerProduct.rebuild(algebra, core: mid, a: algebra.transposed(up), b: down, alpha: alpha),
                                    layer.weightShape)
        }
        return algebra.reshaped(algebra.matmul(up, transposeA: false, down, transposeB: false, alpha: alpha), layer.weightShape)
    }

    /// m·ΔW = m·s·σ·up·down (weight shape).
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, multiplier m: Float) -> A.Value {
        product(algebra, p, alpha: m * scale * p.scalar(algebra))
    }

    /// ∂parameters (in ``parameters``' order) from G = ∂(m·ΔW): with f = m·s·σ,
    /// ∂down = f·upᵀ·G, ∂up = f·G·downᵀ (Tucker: ``TuckerProduct/backward(_:_:core:a:b:alpha:)``),
    /// ∂σ = m·s·⟨G, up·down⟩.
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradient: A.Value,
                                                       multiplier m: Float) -> [(String, A.Value)] {
        let factor = m * scale * p.scalar(algebra)
        let upShape = algebra.shape(of: p.required("lora_up.weight")), downShape = algebra.shape(of: p.required("lora_down.weight"))
        let up = algebra.matrix(p.required("lora_up.weight")), down = algebra.matrix(p.required("lora_down.weight"))
        var grads: [(String, A.Value)]
        if let mid = p["lora_mid.weight"] {
            let g = TuckerProduct.backward(algebra, gradient, core: mid, a: algebra.transposed(up), b: down, alpha: factor)
            grads = [("lora_down.weight", algebra.reshaped(g.b, downShape)), ("lora_mid.weight", g.core),
                     ("lora_up.weight", algebra.reshaped(algebra.transposed(g.a), upShape))]
        } else {
            let gm = algebra.matrix(gradient)
            grads = [("lora_down.weight", algebra.reshaped(algebra.matmul(up, transposeA: true, gm, transposeB: false, alpha: factor), downShape)),
                     ("lora_up.weight", algebra.reshaped(algebra.matmul(gm, transposeA: false, down, transposeB: true, alpha: factor), upShape))]
        }
        if p["scalar"] != nil { grads.append(("scalar", algebra.dot(gradient, product(algebra, p, alpha: 1), scale: m * scale))) }
        return grads
    }

    // MARK: Bypass

    /// Grouped convolutions have no factor path (the factors are not grouped): they use ΔW.
    private var bypassApplies: Bool {
        if case let .convolution(geometry) = layer { return geometry.groups == 1 }
        return true
    }

    /// down (r·in·K, or r·in + r·r·K through the Tucker core) then up (out·r).
    public var bypassCost: Int? {
        guard bypassApplies, let r = rank else { return nil }
        let (inner, out, k) = (layer.weightInFeatures, layer.outFeatures, layer.kernelElements)
        return (usesTucker ? r * inner + r * r * k : r * inner * k) + out * r
    }

    /// down (→ mid) → up with up scaled by `factor` (m·s·σ), so that the chain's output is
    /// m·Δ(x) itself and no pass over the activation applies the scale.
    private func chain(_ context: DeltaContext, factor: Float) -> OperatorChain {
        let up = self.up * factor
        guard usesTucker, case let .convolution(geometry) = layer else {
            return OperatorChain.lowRank(layer, down: down, up: up, rankMask: context.rankMask)
        }
        let (r, axes) = (down.shape[0], geometry.spatialRank)
        return OperatorChain(stages: [
            (.convolution(.pointwise(inChannels: geometry.inChannels, outChannels: r, spatialRank: axes)), down),
            (.convolution(geometry.with(inChannels: r, outChannels: r)), parameters.required("lora_mid.weight")),
            (.convolution(.pointwise(inChannels: r, outChannels: geometry.outChannels, spatialRank: axes)), up),
        ], maskBeforeLast: context.rankMask)
    }

    /// What the chain's stage inputs depend on besides x: down, the Tucker core, the rank mask.
    private func stageKey(_ context: DeltaContext) -> [Tensor] {
        [down] + [parameters["lora_mid.weight"], context.rankMask].compactMap { $0 }
    }

    /// m·Δ(x) through the chain with up' = m·s·σ·up.
    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        guard bypassApplies else { return try weightPathForward(x, multiplier: m, context) }
        return chain(context, factor: m * scale * parameters.scalar).forward(x, caching: context.stageCache, key: stageKey(context))
    }

    /// Through the chain with up' = m·s·σ·up: ∂up = m·s·σ·∂up', and ∂σ = m·s·⟨∂y, up·h⟩ =
    /// m·s·⟨∂up', up⟩ (h the input of the up stage, ∂up' = ∂y·hᵀ), so Δ(x) is not recomputed.
    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        guard bypassApplies else { return try weightPathBackward(x, gradOutput: gradOutput, multiplier: m, context) }
        let factor = m * scale * parameters.scalar
        let chain = chain(context, factor: factor)
        let tape = chain.tape(x, cache: context.stageCache, key: stageKey(context))
        let back = chain.backward(tape, gradOutput: gradOutput)
        let gradScaledUp = back.weights[back.weights.count - 1]
        var grads = ParameterSet()
        grads["lora_down.weight"] = back.weights[0]
        if usesTucker { grads["lora_mid.weight"] = back.weights[1] }
        grads["lora_up.weight"] = gradScaledUp * factor
        if parameters["scalar"] != nil { grads["scalar"] = Tensor(scalar: m * scale * gradScaledUp.dot(up)) }
        return (back.input, grads)
    }

    public func savedTensors() -> [SavedTensor] {
        var saved = [SavedTensor("alpha", Tensor(scalar: savedAlpha), storage: .float32),
                     SavedTensor("lora_up.weight", up * parameters.scalar),
                     SavedTensor("lora_down.weight", down)]
        if let mid = parameters["lora_mid.weight"] { saved.append(SavedTensor("lora_mid.weight", mid)) }
        return saved
    }
}
