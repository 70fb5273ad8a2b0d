import LycorisCore

/// What Diag-OFT and BOFT share: the base layer's output rows pass through an
/// ``OrthogonalChain`` at multiplier m and are then scaled by the optional `rescale` (out,):
///
///     rebuild:  W'(m) = rescale ⊙ chain_m(W0),  ΔW(m) = W'(m) − W0   (rows of W0 as (out, in·K))
///     bypass:   y = op(x, W0) + b,  Δ(x) = rescale ⊙ chain_m(y) − y   (channel axis as rows)
///
/// The multiplier blends each rotation with the identity, so ΔW(m) is not m·ΔW(1): these
/// algorithms override the multiplied members. Rank dropout masks ΔW(m)'s rows. The bypass
/// transforms the base output with its bias (LyCORIS's bypass rotates `org_out`), so it
/// differs from the rebuild on a layer with a bias.
///
/// Backward of Δ = rescale ⊙ Zₛ − Z₀ given g: ∂rescale = Σ_columns g ⊙ Zₛ,
/// ∂Zₛ = rescale ⊙ g, then the chain's backward gives ∂Z₀ (minus g) and ∂oft_blocks.
public protocol OrthogonalAdapter: AdapterAlgorithm {
    /// The chain of `blocks` (`oft_blocks`' values) at multiplier `m`.
    func chain(blocks: Tensor, multiplier m: Float) throws -> OrthogonalChain
    /// A module from `oft_blocks` (and `rescale`), checked against the layer, and the constraint.
    init(layer: LayerSpec, orthogonalParameters: ParameterSet, constraint: Float) throws
}

extension OrthogonalAdapter {
    public var scale: Float { 1 }
    public var rank: Int? { nil }

    private var rescale: Tensor? { parameters["rescale"] }

    private func baseWeight(_ context: DeltaContext) throws -> Tensor {
        guard let base = context.baseWeight else { throw AdapterError("\(Self.algorithm.rawValue) needs the base layer's weight") }
        return base.reshaped([layer.outFeatures, -1])
    }

    /// rescale ⊙ chain(z) − z for rows `z`, with what the backward needs; `oft_blocks` is read
    /// as a host tensor (the chain's block math runs on the host).
    private func transform<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, _ z: A.Value, multiplier m: Float) throws
        -> (delta: A.Value, chain: OrthogonalChain, states: [A.Value]) {
        let chain = try chain(blocks: algebra.hostTensor(p.required("oft_blocks")), multiplier: m)
        let states = chain.forward(algebra, z)
        var out = states.last!
        if let rescale = p["rescale"] { out = algebra.scalingRows(out, by: rescale) }
        return (algebra.adding(out, algebra.scaled(z, by: -1)), chain, states)
    }

    /// (∂z, ∂parameters) of ``transform(_:_:_:multiplier:)`` given ∂Δ: ∂rescale = Σ_columns g ⊙ Zₛ
    /// (in double), then the chain's backward from rescale ⊙ g.
    private func transformBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, _ g: A.Value, chain: OrthogonalChain,
                                                     states: [A.Value]) -> (input: A.Value, parameters: [(String, A.Value)]) {
        var gradFinal = g
        var gradRescale: A.Value?
        if let rescale = p["rescale"] {
            gradRescale = algebra.reshaped(algebra.rowDots(g, states.last!, scale: 1), algebra.shape(of: rescale))
            gradFinal = algebra.scalingRows(g, by: rescale)
        }
        let back = chain.backward(algebra, gradFinal, states: states)
        var result = [("oft_blocks", algebra.reshaped(back.blocks, algebra.shape(of: p.required("oft_blocks"))))]
        if let gradRescale { result.append(("rescale", gradRescale)) }
        return (algebra.adding(back.input, algebra.scaled(g, by: -1)), result)
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// ΔW(m) = rescale ⊙ chain_m(W0) − W0 (weight shape), before any row mask.
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, baseWeight w0: A.Value,
                                               multiplier m: Float) throws -> A.Value {
        let delta = try transform(algebra, p, algebra.matrix(w0), multiplier: m).delta
        return algebra.reshaped(delta, layer.weightShape)
    }

    /// ∂parameters from G = ∂ΔW(m) (already masked by any row mask).
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, baseWeight w0: A.Value,
                                                       gradient: A.Value, multiplier m: Float) throws -> [(String, A.Value)] {
        let forward = try transform(algebra, p, algebra.matrix(w0), multiplier: m)
        return transformBackward(algebra, p, algebra.reshaped(gradient, algebra.shape(of: forward.delta)), chain: forward.chain,
                                 states: forward.states).parameters
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        try multipliedDeltaWeight(1, rowMask: nil, context)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        try multipliedDeltaWeightBackward(gradient, biasGradient: nil, multiplier: 1, rowMask: nil, context)
    }

    public func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor {
        var delta = try deltaWeight(TensorAlgebra(), Factors(parameters), baseWeight: try baseWeight(context), multiplier: m)
        if let rowMask { delta = delta.scalingRows(by: rowMask) }
        return delta
    }

    public func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                              rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        var g = gradient
        if let rowMask { g = g.scalingRows(by: rowMask) }
        return ParameterSet(try deltaWeightBackward(TensorAlgebra(), Factors(parameters), baseWeight: try baseWeight(context),
                                                    gradient: g, multiplier: m))
    }

    // MARK: Bypass: transform the base output's channels

    /// The base output op(x, W0) + b with channels as rows, (C, positions).
    private func baseOutputRows(_ x: Tensor, _ context: DeltaContext) throws -> (rows: Tensor, shape: [Int]) {
        guard let weight = context.baseWeight else { throw AdapterError("\(Self.algorithm.rawValue) needs the base layer's weight") }
        var y = layer.apply(x, weight: weight)
        if let bias = context.baseBias { layer.addBias(&y, bias: bias) }
        return (channelRows(y), y.shape)
    }

    private func channelRows(_ y: Tensor) -> Tensor {
        let c = layer.outFeatures
        guard layer.isConvolution else { return y.reshaped([-1, c]).transposed }
        return y.reshaped([y.shape[0], c, -1]).permuted([1, 0, 2]).reshaped([c, -1])
    }

    private func fromChannelRows(_ z: Tensor, shape: [Int]) -> Tensor {
        guard layer.isConvolution else { return z.transposed.reshaped(shape) }
        return z.reshaped([layer.outFeatures, shape[0], -1]).permuted([1, 0, 2]).reshaped(shape)
    }

    public func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        try multipliedBypassForward(x, multiplier: 1, context)
    }

    public func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        try multipliedBypassBackward(x, gradOutput: gradOutput, multiplier: 1, context)
    }

    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        let base = try baseOutputRows(x, context)
        return fromChannelRows(try transform(TensorAlgebra(), Factors(parameters), base.rows, multiplier: m).delta, shape: base.shape)
    }

    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        let base = try baseOutputRows(x, context)
        let (algebra, p) = (TensorAlgebra(), Factors(parameters))
        let forward = try transform(algebra, p, base.rows, multiplier: m)
        let back = transformBackward(algebra, p, channelRows(gradOutput), chain: forward.chain, states: forward.states)
        let gradY = fromChannelRows(back.input, shape: base.shape)
        return (layer.backwardInput(gradY, weight: context.baseWeight!, inputShape: x.shape), ParameterSet(back.parameters))
    }

    /// A fresh module: `oft_blocks` zeros of `blocksShape` (every R = I), `rescale` ones with
    /// `rescaled`.
    init(layer: LayerSpec, blocksShape: [Int], options: AdapterOptions) throws {
        var p = ParameterSet([("oft_blocks", Tensor.zeros(blocksShape))])
        if options.rescaled { p["rescale"] = Tensor(repeating: 1, shape: DiagOFT.rescaleShape(layer)) }
        try self.init(layer: layer, orthogonalParameters: p, constraint: options.constraint)
    }

    /// A file module: `oft_blocks`, optional `rescale`, and `alpha` = the constraint.
    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        guard let blocks = tensors["oft_blocks"] else { throw AdapterError("\(Self.algorithm.rawValue): oft_blocks is required") }
        var p = ParameterSet([("oft_blocks", blocks)])
        if let rescale = tensors["rescale"] { p["rescale"] = rescale }
        try self.init(layer: layer, orthogonalParameters: p, constraint: alpha ?? 0)
    }

    /// `rescale` is (out, 1…) of the weight's rank; the constraint finite and ≥ 0.
    static func checkRescaleAndConstraint(_ p: ParameterSet, _ constraint: Float, layer: LayerSpec) throws {
        if let rescale = p["rescale"] { try expectShape(rescale, DiagOFT.rescaleShape(layer), "rescale") }
        guard constraint.isFinite && constraint >= 0 else {
            throw AdapterError("\(algorithm.rawValue): constraint must be finite and ≥ 0, got \(constraint)")
        }
    }

    /// `oft_blocks`, `rescale` where trained, and `alpha` (the constraint, F32).
    func orthogonalSavedTensors(constraint: Float) -> [SavedTensor] {
        var saved = [SavedTensor("oft_blocks", parameters.required("oft_blocks"))]
        if let rescale { saved.append(SavedTensor("rescale", rescale)) }
        saved.append(SavedTensor("alpha", Tensor(scalar: constraint), storage: .float32))
        return saved
    }
}
