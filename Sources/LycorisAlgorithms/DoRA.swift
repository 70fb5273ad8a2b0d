import LycorisCore

/// DoRA weight decomposition (LyCORIS `weight_decompose`, kohya `dora_wd`) around a LoCon,
/// LoHa or LoKr module `Base`: the base algorithm's ΔW sets the direction, a trained
/// magnitude `dora_scale` the norm.
///
///     V = W0 + mask ⊙ ΔW               (ΔW the base algorithm's, scale and σ included)
///     n_g = ‖V_g‖ + ε                  (ε = Float.ulpOfOne, LyCORIS's finfo eps)
///     c_g = m·(mag_g / n_g − 1) + 1    (m the multiplier)
///     W'(m) = V ⊙ c                    W'(m) − W0 is what the module adds to W0
///
/// The groups g are the output rows of the weight (`wd_on_out`, the default: `dora_scale`
/// (out, 1, 1…)) or its input columns, every output and kernel position of one input
/// channel (`dora_scale` (1, in, 1…)). m = 1 gives W' = mag_g·V_g/n_g; m = 0 gives V,
/// not W0 (LyCORIS's rule). ``deltaWeight(_:)`` is W'(1) − W0.
/// Init: `dora_scale` = ‖W0_g‖ (so W'(1) = W0 while ΔW = 0).
///
/// Backward, with G = ∂L/∂W' and s_g = Σ_{e∈g} G_e·V_e:
///     ∂mag_g = m·s_g / n_g
///     ∂V_e   = c_g·G_e − m·mag_g·s_g / (n_g²·‖V_g‖) · V_e       (the norm's gradient included)
/// then ∂ΔW = mask ⊙ ∂V into the base algorithm's backward.
/// Files: the base algorithm's keys plus `dora_scale`; its shape says the axis.
/// Bypass: none — the multiplier does not scale a factor path, so DoRA modules compute Δ(x)
/// with the rebuilt weight (LyCORIS's bypass paths drop DoRA silently instead). On the output
/// axis the whole adapted output has a factor path from the base output (``factorForward``).
public struct DoRA<Base: AdapterAlgorithm>: AdapterAlgorithm, FactorPathDecomposition {
    public static var algorithm: Algorithm { Base.algorithm }
    public var base: Base
    /// `dora_scale`, (out, 1, 1…) on output or (1, in, 1…) on input.
    public var magnitude: Tensor
    public let onOutput: Bool

    public var layer: LayerSpec { base.layer }
    public var scale: Float { base.scale }
    public var rank: Int? { base.rank }
    public var hasBypass: Bool { false }

    public var parameters: ParameterSet {
        get {
            var p = base.parameters
            p["dora_scale"] = magnitude
            return p
        }
        set {
            if let value = newValue["dora_scale"] { magnitude = value }
            base.parameters = ParameterSet(newValue.entries.filter { $0.name != "dora_scale" }.map { ($0.name, $0.tensor) })
        }
    }

    /// The shape of `dora_scale` on `layer` for either axis.
    public static func magnitudeShape(layer: LayerSpec, onOutput: Bool) -> [Int] {
        let ones = [Int](repeating: 1, count: layer.weightShape.count - 1)
        return onOutput ? [layer.outFeatures] + ones : [1, layer.weightInFeatures] + ones.dropFirst()
    }

    /// `base` decomposed around `baseWeight`, the magnitude starting at its norms.
    public init(base: Base, baseWeight: Tensor, onOutput: Bool) throws {
        try Self.expectShape(baseWeight, base.layer.weightShape, "the base weight")
        self.base = base
        self.onOutput = onOutput
        magnitude = Tensor(shape: Self.magnitudeShape(layer: base.layer, onOutput: onOutput),
                           scalars: Self.groupNorms(baseWeight, onOutput: onOutput))
    }

    /// `base` with a loaded `dora_scale`; its shape picks the axis ((out, 1…) on output,
    /// (1, in, 1…) on input).
    public init(base: Base, magnitude: Tensor) throws {
        let layer = base.layer
        let output = Self.magnitudeShape(layer: layer, onOutput: true), input = Self.magnitudeShape(layer: layer, onOutput: false)
        guard magnitude.shape == output || magnitude.shape == input else {
            throw AdapterError("\(Self.algorithm.rawValue): dora_scale has shape \(magnitude.shape), expected \(output) (output axis) or \(input) (input axis) for this layer")
        }
        self.base = base
        self.magnitude = magnitude
        onOutput = magnitude.shape == output
    }

    /// DoRA needs W0 at construction: ``Algorithm/makeAdapter(layer:options:random:baseWeight:hasBias:)``
    /// builds it from the base algorithm.
    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        throw AdapterError("\(Self.algorithm.rawValue) with weight_decompose needs the base layer's weight")
    }

    /// The weight seen along its groups, (outer, groups, inner): (1, out, in·K) on output,
    /// (out, in, K) on input (K the kernel positions).
    static func groupLayout(_ shape: [Int], onOutput: Bool) -> ChannelLayout {
        ChannelLayout(count: shape.product, channels: onOutput ? shape[0] : shape[1],
                      inner: shape.dropFirst(onOutput ? 1 : 2).reduce(1, *))
    }

    /// ‖w_g‖ per group: Float sums over blocks added in Double (``Tensor/channelSums(_:times:minus:)``).
    static func groupNorms(_ w: Tensor, onOutput: Bool) -> [Float] {
        w.channelSums(groupLayout(w.shape, onOutput: onOutput), times: w).map { $0.squareRoot() }
    }

    private func baseWeight(_ context: DeltaContext) throws -> Tensor {
        guard let w0 = context.baseWeight else { throw AdapterError("\(Self.algorithm.rawValue) with dora_scale needs the base layer's weight") }
        return w0
    }

    /// V = W0 + mask ⊙ ΔW, its group norms ‖V_g‖ and the factors c_g.
    private func decomposition(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> (v: Tensor, norms: [Float], factors: [Float]) {
        // (ΔW itself without a mask: the multiplied form would copy it once more.)
        var v = try rowMask == nil ? base.deltaWeight(context) : base.multipliedDeltaWeight(1, rowMask: rowMask, context)
        v.add(try baseWeight(context))
        let norms = Self.groupNorms(v, onOutput: onOutput)
        return (v, norms, factors(m, norms: norms))
    }

    /// c_g = m·(mag_g/(n_g + ε) − 1) + 1.
    private func factors(_ m: Float, norms: [Float]) -> [Float] {
        norms.indices.map { g in m * (magnitude.scalars[g] / (norms[g] + Float.ulpOfOne) - 1) + 1 }
    }

    /// The base algorithm's parameter gradients from ∂(mask ⊙ ΔW) (without a mask, ΔW's own
    /// backward: the multiplied form would copy the gradient once more).
    private func baseBackward(_ gradient: Tensor, rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        guard let rowMask else { return try base.deltaWeightBackward(gradient, context) }
        return try base.multipliedDeltaWeightBackward(gradient, biasGradient: nil, multiplier: 1, rowMask: rowMask, context)
    }

    /// ∂mag and the coefficient k_g of V in ∂V's norm term, from s_g = ∂L/∂c_g = Σ_{e∈g} G_e·V_e:
    /// ∂mag_g = m·s_g/n_g, k_g = −m·mag_g·s_g/(n_g²·‖V_g‖) (0 for a zero slice).
    private func normGradients(_ s: [Float], norms: [Float], multiplier m: Float) -> (magnitude: Tensor, normTerm: [Float]) {
        let gradMagnitude = norms.indices.map { m * s[$0] / (norms[$0] + Float.ulpOfOne) }
        let normTerm = norms.indices.map { g -> Float in
            guard norms[g] > 0 else { return 0 }
            let n = norms[g] + Float.ulpOfOne
            return -m * magnitude.scalars[g] * s[g] / (n * n * norms[g])
        }
        return (Tensor(shape: magnitude.shape, scalars: gradMagnitude), normTerm)
    }

    public func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor {
        let (v, _, factors) = try decomposition(m, rowMask: rowMask, context)
        var delta = v.channelAffine(Self.groupLayout(v.shape, onOutput: onOutput), scales: factors)
        delta.add(try baseWeight(context), scaledBy: -1)
        return delta
    }

    public func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                              rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        let (v, norms, factors) = try decomposition(m, rowMask: rowMask, context)
        let layout = Self.groupLayout(v.shape, onOutput: onOutput)
        let (gradMagnitude, normTerm) = normGradients(gradient.channelSums(layout, times: v), norms: norms, multiplier: m)
        var gradV = gradient.channelAffine(layout, scales: factors)
        gradV.add(v.channelAffine(layout, scales: normTerm))
        var grads = try baseBackward(gradV, rowMask: rowMask, context)
        grads["dora_scale"] = gradMagnitude
        return grads
    }

    // MARK: Factor path (norm per output row)

    /// Whether ``factorForward(_:baseOutput:bias:multiplier:_:)`` applies: the norm per output
    /// row (`wd_on_out`, LyCORIS's default) and a base algorithm whose factor path computes
    /// exactly op(x, ΔW). On the input axis the scales act on x before W0, so that axis keeps
    /// the rebuilt weight.
    public var hasFactorPath: Bool { onOutput && base.bypassCost != nil }

    /// The adapted layer's output from the base output y0 = op(x, W0) + b and the base
    /// algorithm's factor path Δ(x) = op(x, ΔW), never op(x, W'): with the norm per output
    /// row, op(x, W') = c ⊙ op(x, V), so
    ///
    ///     s  = y0 + Δ(x)                        (= op(x, V) + b)
    ///     y' = c ⊙ (s − b) + b = c ⊙ s + (1 − c) ⊙ b        (c, b per output channel)
    ///
    /// x (N, …, in) or (N, in, spatial…); y0, s and y' the layer's output shape. Returns y' and
    /// s (what ``factorBackward(_:directed:bias:gradOutput:multiplier:_:)`` reads). Cost: V's row
    /// norms (around a plain LoCon from W0·downᵀ without forming V, ``LowRankRowNorms``; else
    /// ΔW, V and a pass: out·in·r + out·in), the chain, two passes over the output.
    public func factorForward(_ x: Tensor, baseOutput y0: Tensor, bias: Tensor?, multiplier m: Float,
                              _ context: DeltaContext) throws -> (output: Tensor, directed: Tensor) {
        let factors = try LowRankRowNorms(base, baseWeight: baseWeight(context)).map { self.factors(m, norms: $0.norms) }
            ?? decomposition(m, rowMask: nil, context).factors
        var s = try base.multipliedBypassForward(x, multiplier: 1, context)
        s.add(y0)
        let shifts = bias.map { b in factors.indices.map { (1 - factors[$0]) * b.scalars[$0] } }
        return (s.channelAffine(layer.channelLayout(of: s.shape), scales: factors, shifts: shifts), s)
    }

    /// (∂x, ∂y0, ∂parameters) of ``factorForward(_:baseOutput:bias:multiplier:_:)`` given
    /// g = ∂y', with s its directed output:
    ///
    ///     ∂y0 = c ⊙ g;   ∂x, ∂factors from the chain at ∂Δ(x) = c ⊙ g
    ///     s_g = ∂L/∂c_g = Σ g ⊙ (s − b) over every axis but the channel axis
    ///     ∂mag, and ∂ΔW += k ⊙_rows V into the base algorithm's ΔW backward (out·in·r GEMMs)
    ///
    /// (∂mag and k as in the weight path: W' = c ⊙ V gives the same s_g = Σ_e G_e·V_e.)
    public func factorBackward(_ x: Tensor, directed s: Tensor, bias: Tensor?, gradOutput g: Tensor, multiplier m: Float,
                               _ context: DeltaContext) throws -> (input: Tensor, baseOutput: Tensor, parameters: ParameterSet) {
        let lowRank = LowRankRowNorms(base, baseWeight: try baseWeight(context))
        let explicit = lowRank == nil ? try decomposition(m, rowMask: nil, context) : nil
        let norms = lowRank?.norms ?? explicit!.norms
        let factors = factors(m, norms: norms)
        let layout = layer.channelLayout(of: g.shape)
        let gradBase = g.channelAffine(layout, scales: factors)
        let chain = try base.multipliedBypassBackward(x, gradOutput: gradBase, multiplier: 1, context)
        let (gradMagnitude, normTerm) = normGradients(g.channelSums(layout, times: s, minus: bias?.scalars), norms: norms, multiplier: m)
        var grads = try lowRank.map { $0.normTermGradients(normTerm, upShape: base.parameters.required("lora_up.weight").shape,
                                                                downShape: base.parameters.required("lora_down.weight").shape) }
            ?? baseBackward(explicit!.v.scalingRows(by: Tensor(shape: [normTerm.count], scalars: normTerm)), rowMask: nil, context)
        for (name, tensor) in chain.parameters.entries {
            if var sum = grads[name] { sum.add(tensor); grads[name] = sum } else { grads[name] = tensor }
        }
        grads["dora_scale"] = gradMagnitude
        return (chain.input, gradBase, grads)
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        try multipliedDeltaWeight(1, rowMask: nil, context)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        try multipliedDeltaWeightBackward(gradient, biasGradient: nil, multiplier: 1, rowMask: nil, context)
    }

    public func savedTensors() -> [SavedTensor] {
        base.savedTensors() + [SavedTensor("dora_scale", magnitude)]
    }
}

/// DoRA's factor path, seen without its base algorithm's type (``AdapterModule``'s
/// elementwise transfer): see ``DoRA/factorForward(_:baseOutput:bias:multiplier:_:)``.
public protocol FactorPathDecomposition: AdapterAlgorithm {
    var hasFactorPath: Bool { get }
    func factorForward(_ x: Tensor, baseOutput y0: Tensor, bias: Tensor?, multiplier m: Float,
                       _ context: DeltaContext) throws -> (output: Tensor, directed: Tensor)
    func factorBackward(_ x: Tensor, directed s: Tensor, bias: Tensor?, gradOutput g: Tensor, multiplier m: Float,
                        _ context: DeltaContext) throws -> (input: Tensor, baseOutput: Tensor, parameters: ParameterSet)
}
