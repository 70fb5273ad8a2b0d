import LycorisCore

/// One adapter attached to one base layer: the algorithm's math plus what LyCORIS's
/// `LycorisBaseModule` adds around it — multiplier, train/eval mode, the three dropouts,
/// rebuild vs bypass, and the base weight when the algorithm needs it.
///
///     y = op(x, W0) + b + m·Δ(x)
///     rebuild: Δ(x) = op(x, mask_rows ⊙ ΔW) (+ mask_rows ⊙ Δb)    bypass: Δ(x) = drop(algorithm.bypass(x))
public struct AdapterModule: Sendable {
    public var name: String
    public var algorithm: any AdapterAlgorithm
    public var options: AdapterOptions
    public var multiplier: Float = 1
    public var isTraining = false
    /// The base layer's weight and bias, where known (IA3 needs the weight; the full
    /// ``forward(_:tape:)`` needs both).
    public var baseWeight: Tensor?
    public var baseBias: Tensor?
    /// T-LoRA's rank mask for the coming steps (``DeltaContext/timestepMask``).
    public var timestepMask: Tensor?

    public var layer: LayerSpec { algorithm.layer }

    public init(name: String, algorithm: any AdapterAlgorithm, options: AdapterOptions,
                baseWeight: Tensor? = nil, baseBias: Tensor? = nil) {
        self.name = name
        self.algorithm = algorithm
        self.options = options
        self.baseWeight = baseWeight
        self.baseBias = baseBias
    }

    /// The random choices one forward made, replayed by its backward.
    public struct Tape: Sendable {
        /// module_dropout skipped the adapter for this step.
        public var skipped = false
        public var bypass = false
        public var context = DeltaContext()
        /// Rebuild rank dropout: (out,) mask on ΔW's rows (and on Δb).
        public var rowMask: Tensor?
        /// Bypass dropout: elementwise mask of Δ(x), already divided by 1−p.
        public var outputMask: Tensor?
    }


    private var isDyLoRA: Bool { algorithm is DyLoRA }

    /// Draws every random choice of one step on an input of `inputShape`: module dropout,
    /// DyLoRA's block, rank-dropout masks and the bypass dropout mask. Eval mode draws none
    /// (DyLoRA then uses all blocks).
    public func makeTape(inputShape: [Int], random: inout RandomSource) -> Tape {
        var tape = Tape()
        tape.context = DeltaContext(baseWeight: baseWeight, baseBias: baseBias, timestepMask: timestepMask)
        if isTraining && options.moduleDropout > 0 && random.bernoulli(options.moduleDropout) {
            tape.skipped = true
            return tape
        }
        if let dylora = algorithm as? DyLoRA {
            tape.context.block = isTraining ? Int(random.next() % UInt64(dylora.blockCount)) : dylora.blockCount - 1
        }
        let rankDropout = isTraining && options.rankDropout > 0
        switch options.bypassMode {
        case true?:
            // LoCon masks the rank axis in bypass; every other case masks ΔW's rows, which
            // the factor paths cannot express, so those fall back to rebuild.
            // DoRA has no bypass path: it always rebuilds.
            tape.bypass = algorithm.hasBypass && (!rankDropout || algorithm is LoCon)
        case false?:
            tape.bypass = false
        case nil:
            // Rebuild semantics, computed by the factor path when that is the same function
            // and cheaper (training dropouts would make the two differ).
            let dropoutActive = isTraining && (options.rankDropout > 0 || options.dropout > 0)
            tape.bypass = !dropoutActive && hasCheaperFactorPath
        }
        if rankDropout {
            let length = tape.bypass ? (algorithm.rank ?? 0) : layer.outFeatures
            let mask = Self.keepMask(count: length, drop: options.rankDropout, rescale: options.rankDropoutScale, random: &random)
            if tape.bypass { tape.context.rankMask = mask } else { tape.rowMask = mask }
        }
        if tape.bypass && isTraining && options.dropout > 0 {
            let keep = 1 - options.dropout
            let count = layer.outputShape(forInput: inputShape).product
            tape.outputMask = Tensor(shape: layer.outputShape(forInput: inputShape),
                                     scalars: (0..<count).map { _ in random.nextUnit() < keep ? 1 / keep : 0 })
        }
        return tape
    }

    /// Whether Δ(x) has a factor path that computes exactly op(x, ΔW) with fewer
    /// multiply-adds per output position than op(x, ΔW) itself (out·in·K): the path the
    /// forward takes with `bypass_mode` unset and no training dropout. Without one, Δ(x)
    /// costs the server a whole op(x, ΔW), and its backward two more.
    public var hasCheaperFactorPath: Bool {
        guard let cost = algorithm.bypassCost else { return false }
        return cost < layer.outFeatures * layer.weightInFeatures * layer.kernelElements
    }

    /// A (count,) mask of 1s kept with probability 1−p (LyCORIS `rand > p`), divided by its
    /// mean when `rescale` (and the mean is not 0).
    static func keepMask(count: Int, drop p: Float, rescale: Bool, random: inout RandomSource) -> Tensor {
        var mask = Tensor(shape: [count], scalars: (0..<count).map { _ in random.nextUnit() > p ? 1 : 0 })
        if rescale, mask.sum > 0 { mask = mask * (Float(count) / mask.sum) }
        return mask
    }

    /// W'(m) − W0 as the forward uses it (LyCORIS: m·(row mask ⊙ ΔW); see
    /// ``AdapterAlgorithm/multipliedDeltaWeight(_:rowMask:_:)``).
    public func effectiveDeltaWeight(_ tape: Tape) throws -> Tensor {
        if tape.skipped { return .zeros(layer.weightShape) }
        return try algorithm.multipliedDeltaWeight(multiplier, rowMask: tape.rowMask, tape.context)
    }

    /// b'(m) − b0 as the forward uses it, m·(row mask ⊙ Δb); nil when the algorithm does not
    /// adapt the bias.
    public func effectiveDeltaBias(_ tape: Tape) throws -> Tensor? {
        guard algorithm.adaptsBias else { return nil }
        if tape.skipped { return .zeros(layer.biasShape) }
        return try algorithm.multipliedDeltaBias(multiplier, rowMask: tape.rowMask, tape.context)
    }

    /// Gradients of the parameters from ∂L/∂(W' − W0) and ∂L/∂(b' − b0) (nil: zero) —
    /// rebuild-mode trainers that apply W0 + (W' − W0) (and b0 + (b' − b0)) themselves.
    public func effectiveDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor? = nil, _ tape: Tape) throws -> ParameterSet {
        if tape.skipped { return zeroGradients() }
        return try algorithm.multipliedDeltaWeightBackward(gradient, biasGradient: biasGradient, multiplier: multiplier,
                                                           rowMask: tape.rowMask, tape.context)
    }

    /// ∂L/∂Δb's layer part, Σ ∂y over all but the channel axis, where the algorithm adapts the bias.
    private func biasGradient(_ gradOutput: Tensor) -> Tensor? {
        algorithm.adaptsBias ? layer.biasGradient(gradOutput) : nil
    }

    /// The adapter's contribution m·Δ(x) for the step `tape` describes.
    public func forwardDelta(_ x: Tensor, tape: Tape) throws -> Tensor {
        if let problem = layer.inputProblem(x.shape) { throw AdapterError("\(name): \(problem)") }
        if tape.skipped { return .zeros(layer.outputShape(forInput: x.shape)) }
        guard tape.bypass else {
            var y = layer.apply(x, weight: try effectiveDeltaWeight(tape))
            if let bias = try effectiveDeltaBias(tape) { layer.addBias(&y, bias: bias) }
            return y
        }
        var delta = try algorithm.multipliedBypassForward(x, multiplier: multiplier, tape.context)
        if let mask = tape.outputMask { delta = delta * mask }
        return delta
    }

    /// (∂x, ∂parameters) of ``forwardDelta(_:tape:)`` given ∂(m·Δ(x)).
    public func backwardDelta(_ x: Tensor, gradOutput: Tensor, tape: Tape) throws -> (input: Tensor, parameters: ParameterSet) {
        if tape.skipped { return (.zeros(x.shape), zeroGradients()) }
        if tape.bypass {
            var g = gradOutput
            if let mask = tape.outputMask { g = g * mask }
            return try algorithm.multipliedBypassBackward(x, gradOutput: g, multiplier: multiplier, tape.context)
        }
        let delta = try effectiveDeltaWeight(tape)
        let gradInput = layer.backwardInput(gradOutput, weight: delta, input: x)
        let gradDelta = layer.backwardWeight(x, gradOutput: gradOutput)
        return (gradInput, try effectiveDeltaWeightBackward(gradDelta, biasGradient: biasGradient(gradOutput), tape))
    }

    /// The adapted layer's whole output `op(x, W0) + b + m·Δ(x)` (needs the base weight; a
    /// missing bias counts as zero).
    ///
    /// In rebuild mode this is one op with the merged weight, `op(x, W0 + m·ΔW) + b (+ m·Δb)`
    /// (as LyCORIS's result, with one layer op instead of two).
    public func forward(_ x: Tensor, tape: Tape) throws -> Tensor {
        let weight = try requireBaseWeight()
        if let problem = layer.inputProblem(x.shape) { throw AdapterError("\(name): \(problem)") }
        var y: Tensor
        if tape.bypass {
            y = layer.apply(x, weight: weight) + (try forwardDelta(x, tape: tape))
        } else {
            y = layer.apply(x, weight: weight + (try effectiveDeltaWeight(tape)))
            if let bias = try effectiveDeltaBias(tape) { layer.addBias(&y, bias: bias) }
        }
        if let bias = baseBias { layer.addBias(&y, bias: bias) }
        return y
    }

    /// (∂x, ∂parameters) of ``forward(_:tape:)``.
    public func backward(_ x: Tensor, gradOutput: Tensor, tape: Tape) throws -> (input: Tensor, parameters: ParameterSet) {
        let weight = try requireBaseWeight()
        if tape.bypass || tape.skipped {
            let adapter = try backwardDelta(x, gradOutput: gradOutput, tape: tape)
            return (layer.backwardInput(gradOutput, weight: weight, input: x) + adapter.input, adapter.parameters)
        }
        // Rebuild: ∂x = op_x-gradient through W0 + m·ΔW; ∂(m·ΔW) = op_W-gradient.
        let merged = weight + (try effectiveDeltaWeight(tape))
        let gradDelta = layer.backwardWeight(x, gradOutput: gradOutput)
        return (layer.backwardInput(gradOutput, weight: merged, input: x),
                try effectiveDeltaWeightBackward(gradDelta, biasGradient: biasGradient(gradOutput), tape))
    }

    /// The module in eval mode and its (deterministic) tape: what merging applies.
    private func evalTape() -> (module: AdapterModule, tape: Tape) {
        var eval = self
        eval.isTraining = false
        var unused = RandomSource(seed: 0)
        return (eval, eval.makeTape(inputShape: [], random: &unused))
    }

    /// The merged weight W0 + m·ΔW (forward semantics; deterministic: eval-mode choices).
    public func mergedWeight() throws -> Tensor {
        let (eval, tape) = evalTape()
        return try requireBaseWeight() + eval.effectiveDeltaWeight(tape)
    }

    /// The merged bias b + m·Δb (a missing base bias counts as zero); nil when the algorithm
    /// does not adapt the bias.
    public func mergedBias() throws -> Tensor? {
        let (eval, tape) = evalTape()
        guard let delta = try eval.effectiveDeltaBias(tape) else { return nil }
        return (baseBias ?? .zeros(layer.biasShape)) + delta
    }

    private func requireBaseWeight() throws -> Tensor {
        guard let baseWeight else { throw AdapterError("\(name): the base layer's weight is not known") }
        return baseWeight
    }

    func zeroGradients() -> ParameterSet {
        ParameterSet(algorithm.parameters.entries.map { ($0.name, Tensor.zeros($0.tensor.shape)) })
    }
}
