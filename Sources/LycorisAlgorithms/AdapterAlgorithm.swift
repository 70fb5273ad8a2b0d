import LycorisCore

/// The per-call inputs an algorithm's math may need beyond its parameters.
public struct DeltaContext: Sendable {
    /// The base layer's weight W0 (IA3 scales it; others ignore it).
    public var baseWeight: Tensor?
    /// The base layer's bias (IA3's output-scaling bypass includes it).
    public var baseBias: Tensor?
    /// DyLoRA: the rank block b of this step (blocks 0…b are used, only b is trained).
    public var block: Int?
    /// LoCon bypass with rank dropout: the (r,) mask applied between down and up.
    public var rankMask: Tensor?
    /// T-LoRA: the timestep's rank mask (LyCORIS `set_timestep_mask`); nil: all ranks.
    public var timestepMask: Tensor?
    /// The bypass forward's stage inputs for its backward (shared by copies of the context).
    public let stageCache = StageCache()

    public init(baseWeight: Tensor? = nil, baseBias: Tensor? = nil, block: Int? = nil, rankMask: Tensor? = nil,
                timestepMask: Tensor? = nil) {
        self.baseWeight = baseWeight
        self.baseBias = baseBias
        self.block = block
        self.rankMask = rankMask
        self.timestepMask = timestepMask
    }
}

/// One tensor of an adapter's saved state, with the storage it keeps in a file.
public struct SavedTensor: Sendable {
    public enum Storage: Sendable {
        /// Stored in the dtype the caller saves with (F32, F16 or BF16).
        case followsFile
        /// Always F32 (the `alpha` scalar).
        case float32
        /// Always I64 (IA3's `on_input` flag).
        case int64
    }
    public var suffix: String
    public var tensor: Tensor
    public var storage: Storage

    public init(_ suffix: String, _ tensor: Tensor, storage: Storage = .followsFile) {
        self.suffix = suffix
        self.tensor = tensor
        self.storage = storage
    }
}

/// An error in an adapter's description or in the tensors loaded for it.
public struct AdapterError: Error, CustomStringConvertible, Sendable, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The math of one adapter algorithm on one layer.
///
/// Conventions: ΔW has the base weight's shape and includes the algorithm's scale and
/// scalar but not the multiplier (the module applies it: W' = W0 + m·ΔW). Δ(x) is the
/// adapter's additive output, `y = op(x, W0) + b + m·Δ(x)`. Algorithms that adapt the
/// bias too (``adaptsBias``) have a Δb of the bias's shape: b' = b + m·Δb and
/// Δ(x) = op(x, ΔW) + Δb; for the others Δb = 0.
public protocol AdapterAlgorithm: Sendable {
    static var algorithm: Algorithm { get }
    /// A fresh module with LyCORIS's initialisation.
    init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws
    var layer: LayerSpec { get }
    /// Trainable parameters, named by their saved key suffix (`scalar` for use_scalar).
    var parameters: ParameterSet { get set }
    /// The scale ΔW is multiplied by (α/r and variants).
    var scale: Float { get }
    /// The rank (for display), or nil where the algorithm has none.
    var rank: Int? { get }

    /// ΔW (weight shape).
    func deltaWeight(_ context: DeltaContext) throws -> Tensor
    /// ∂L/∂parameters from ∂L/∂ΔW.
    func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet
    /// Whether the algorithm adapts the base layer's bias (norm on a layer with a bias).
    var adaptsBias: Bool { get }
    /// Δb (``LayerSpec/biasShape``); zeros for algorithms that do not adapt the bias.
    func deltaBias(_ context: DeltaContext) throws -> Tensor
    /// ∂L/∂parameters from ∂L/∂ΔW and ∂L/∂Δb (nil: zero).
    func deltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, _ context: DeltaContext) throws -> ParameterSet
    /// Δ(x) computed from the factors where the algorithm has a cheaper path than op(x, ΔW).
    func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor
    /// (∂x, ∂parameters) of ``bypassForward(_:_:)`` given ∂Δ(x).
    func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet)
    /// Multiply-adds per output position of the factor path, when the algorithm has one that
    /// computes exactly op(x, ΔW); nil otherwise. With `bypass_mode` unset, the module takes
    /// that path when it is cheaper than op(x, ΔW) (out·in·K per position).
    var bypassCost: Int? { get }
    /// Whether the algorithm has a bypass path of its own; false for DoRA, whose weight
    /// decomposition needs the whole rebuilt W', so bypass mode computes with that weight.
    /// (A multiplier that enters nonlinearly is ``multipliedBypassForward(_:multiplier:_:)``'s
    /// concern, not this.)
    var hasBypass: Bool { get }
    /// What a file stores for this module, key suffix → tensor (scalar folded in).
    func savedTensors() -> [SavedTensor]

    /// W'(m) − W0: the change the module makes to the base weight with multiplier `m`, after
    /// the rebuild rank-dropout mask (`rowMask`, (out,) on ΔW's rows; nil: none).
    ///
    /// The default is LyCORIS's additive rule m·(mask ⊙ ΔW). Algorithms whose multiplier
    /// does not scale ΔW linearly (DoRA's decomposition, BOFT's per-stage blend) or that
    /// mask something else override this and the two members below together.
    func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor
    /// b'(m) − b0 where the algorithm adapts the bias (nil otherwise); default m·(mask ⊙ Δb).
    func multipliedDeltaBias(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor?
    /// ∂L/∂parameters from ∂L/∂(W'(m) − W0) and ∂L/∂(b'(m) − b0) (nil: zero).
    func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                       rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet

    /// The bypass contribution with multiplier `m`; default m·``bypassForward(_:_:)``.
    /// Overridden together with the member below where m does not scale Δ(x) (OFT, BOFT).
    func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor
    /// (∂x, ∂parameters) of ``multipliedBypassForward(_:multiplier:_:)`` given its ∂output.
    func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                  _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet)
}

extension AdapterAlgorithm {
    public var bypassCost: Int? { nil }

    public var hasBypass: Bool { true }

    public var adaptsBias: Bool { false }

    public func deltaBias(_ context: DeltaContext) throws -> Tensor { .zeros(layer.biasShape) }

    public func deltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        try deltaWeightBackward(gradient, context)
    }

    /// op(x, ΔW) (+ Δb where the algorithm adapts the bias).
    public func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        try weightPathForward(x, multiplier: 1, context)
    }

    public func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        try weightPathBackward(x, gradOutput: gradOutput, multiplier: 1, context)
    }

    /// m·op(x, ΔW) (+ m·Δb where the algorithm adapts the bias): the bypass of an algorithm,
    /// or of a layer, without a factor path.
    public func weightPathForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        var y = layer.apply(x, weight: Self.scaled(try deltaWeight(context), m))
        if adaptsBias { layer.addBias(&y, bias: Self.scaled(try deltaBias(context), m)) }
        return y
    }

    /// (∂x, ∂parameters) of ``weightPathForward(_:multiplier:_:)``.
    public func weightPathBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                   _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        let gradInput = layer.backwardInput(gradOutput, weight: Self.scaled(try deltaWeight(context), m), input: x)
        let gradDelta = Self.scaled(layer.backwardWeight(x, gradOutput: gradOutput), m)
        let gradBias = adaptsBias ? Self.scaled(layer.biasGradient(gradOutput), m) : nil
        return (gradInput, try deltaWeightBackward(gradDelta, biasGradient: gradBias, context))
    }

    /// m·t, without a pass when m is 1.
    private static func scaled(_ t: Tensor, _ m: Float) -> Tensor { m == 1 ? t : t * m }

    public func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor {
        var delta = try deltaWeight(context)
        if let rowMask { delta = delta.scalingRows(by: rowMask) }
        return delta * m
    }

    public func multipliedDeltaBias(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor? {
        guard adaptsBias else { return nil }
        var delta = try deltaBias(context)
        if let rowMask { delta = delta.scalingRows(by: rowMask) }
        return delta * m
    }

    public func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                              rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        var g = gradient * m
        var gBias = biasGradient.map { $0 * m }
        if let rowMask {
            g = g.scalingRows(by: rowMask)
            gBias = gBias.map { $0.scalingRows(by: rowMask) }
        }
        return try deltaWeightBackward(g, biasGradient: gBias, context)
    }

    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        try bypassForward(x, context) * m
    }

    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        try bypassBackward(x, gradOutput: gradOutput * m, context)
    }

    /// Number of trainable scalars.
    public var parameterCount: Int { parameters.scalarCount }

    /// Checks that `tensor` has `shape`, naming the parameter otherwise.
    static func expectShape(_ tensor: Tensor, _ shape: [Int], _ name: String) throws {
        guard tensor.shape == shape else {
            throw AdapterError("\(algorithm.rawValue): \(name) has shape \(tensor.shape), expected \(shape) for this layer")
        }
    }
}

extension Tensor {
    /// Each leading-axis slice i multiplied by `factors[i]` (a rank-dropout mask on ΔW's rows).
    func scalingRows(by factors: Tensor) -> Tensor {
        channelAffine(ChannelLayout(count: count, channels: factors.count, inner: count / factors.count), scales: factors.scalars)
    }
}

/// The optional trainable scalar σ (use_scalar): ΔW is multiplied by it; saved files fold it
/// into one factor and a loaded module has none (σ = 1).
extension ParameterSet {
    var scalar: Float { self["scalar"]?.scalarValue ?? 1 }
}
