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
/// Bypass: none — the multiplier does not scale a factor path, so DoRA modules always
/// compute with the rebuilt weight (LyCORIS's bypass paths drop DoRA silently instead).
public struct DoRA<Base: AdapterAlgorithm>: AdapterAlgorithm {
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
        let groups = Groups(shape: baseWeight.shape, onOutput: onOutput)
        magnitude = Tensor(shape: Self.magnitudeShape(layer: base.layer, onOutput: onOutput),
                           scalars: groups.sums(baseWeight, baseWeight).map { Float($0.squareRoot()) })
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

    /// The slices of the weight the norms run over: blocks of contiguous elements, each in
    /// one group — a whole output row (on output), or one (out, in) pair's kernel positions
    /// (on input, group = the input channel).
    struct Groups {
        let count: Int
        /// Elements per block, and blocks.
        let blockSize: Int, blocks: Int
        let onOutput: Bool

        init(shape: [Int], onOutput: Bool) {
            self.onOutput = onOutput
            blockSize = onOutput ? shape.dropFirst().reduce(1, *) : shape.dropFirst(2).reduce(1, *)
            blocks = shape.reduce(1, *) / max(blockSize, 1)
            count = onOutput ? shape[0] : shape[1]
        }

        func group(ofBlock block: Int) -> Int { onOutput ? block : block % count }

        /// Σ_{e∈g} a_e·b_e per group, in Double.
        func sums(_ a: Tensor, _ b: Tensor) -> [Double] {
            var sums = [Double](repeating: 0, count: count)
            a.scalars.withUnsafeBufferPointer { x in
                b.scalars.withUnsafeBufferPointer { y in
                    for block in 0..<blocks {
                        var sum = 0.0
                        for e in (block * blockSize)..<((block + 1) * blockSize) { sum += Double(x[e]) * Double(y[e]) }
                        sums[group(ofBlock: block)] += sum
                    }
                }
            }
            return sums
        }

        /// f(e, g) for every element e of group g, as a tensor of `shape`.
        func map(shape: [Int], _ f: (Int, Int) -> Float) -> Tensor {
            var scalars = [Float](repeating: 0, count: blocks * blockSize)
            scalars.withUnsafeMutableBufferPointer { out in
                for block in 0..<blocks {
                    let g = group(ofBlock: block)
                    for e in (block * blockSize)..<((block + 1) * blockSize) { out[e] = f(e, g) }
                }
            }
            return Tensor(shape: shape, scalars: scalars)
        }
    }

    private func baseWeight(_ context: DeltaContext) throws -> Tensor {
        guard let w0 = context.baseWeight else { throw AdapterError("\(Self.algorithm.rawValue) with dora_scale needs the base layer's weight") }
        return w0
    }

    /// V = W0 + mask ⊙ ΔW, its group norms ‖V_g‖ and the factors c_g.
    private func decomposition(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> (v: Tensor, norms: [Double], factors: [Float]) {
        let v = try baseWeight(context) + base.multipliedDeltaWeight(1, rowMask: rowMask, context)
        let norms = Groups(shape: v.shape, onOutput: onOutput).sums(v, v).map { $0.squareRoot() }
        let factors = norms.indices.map { g in
            m * (magnitude.scalars[g] / Float(norms[g] + Double(Float.ulpOfOne)) - 1) + 1
        }
        return (v, norms, factors)
    }

    public func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor {
        let (v, _, factors) = try decomposition(m, rowMask: rowMask, context)
        let groups = Groups(shape: v.shape, onOutput: onOutput)
        let w0 = try baseWeight(context)
        return groups.map(shape: v.shape) { e, g in v.scalars[e] * factors[g] - w0.scalars[e] }
    }

    public func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                              rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        let (v, norms, factors) = try decomposition(m, rowMask: rowMask, context)
        let groups = Groups(shape: v.shape, onOutput: onOutput)
        let s = groups.sums(gradient, v)
        let eps = Double(Float.ulpOfOne)
        let gradMagnitude = norms.indices.map { Float(Double(m) * s[$0] / (norms[$0] + eps)) }
        // Coefficient of V_e in ∂V_e from the norm: −m·mag·s / (n²·‖V‖) (0 for a zero slice).
        let normTerm = norms.indices.map { g -> Double in
            guard norms[g] > 0 else { return 0 }
            let n = norms[g] + eps
            return -Double(m) * Double(magnitude.scalars[g]) * s[g] / (n * n * norms[g])
        }
        let gradV = groups.map(shape: v.shape) { e, g in
            Float(Double(gradient.scalars[e]) * Double(factors[g]) + normTerm[g] * Double(v.scalars[e]))
        }
        var grads = try base.multipliedDeltaWeightBackward(gradV, biasGradient: nil, multiplier: 1, rowMask: rowMask, context)
        grads["dora_scale"] = Tensor(shape: magnitude.shape, scalars: gradMagnitude)
        return grads
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
