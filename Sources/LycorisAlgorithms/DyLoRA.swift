import LycorisCore

/// DyLoRA (LyCORIS `DyLoraModule`): a LoRA whose rank is trained in blocks.
///
/// `lora_up.weight` (out, r) and `lora_down.weight` (r, in/g[, k…]) hold r/bs blocks of
/// bs = block_size columns / rows. A step uses block b: blocks 0…b enter ΔW, only block b
/// receives gradient (the earlier ones are used detached):
///
///     ΔW_b = α/(b+1) · up[:, :(b+1)·bs] · down[:(b+1)·bs]
///
/// Training picks b uniformly per step (the module does); evaluation uses every block
/// (b = r/bs − 1) — LyCORIS picks a random b even in eval mode, which this does not copy.
/// Init: down kaiming-uniform(a=√5), up zeros.
///
/// Bypass (linear and ungrouped conv): Δ(x) = α/(b+1)·op(op(x, down[:(b+1)·bs]), up[:, :(b+1)·bs]),
/// a LoCon chain of rank (b+1)·bs whose gradients are kept for block b only.
///
/// Files are LoRA files. LyCORIS saves the raw α, so loaders (alpha/r) apply a scale bs
/// times smaller than DyLoRA's own full-rank forward, and saves `lora_up.weight` 2-D for
/// convolutions so its own loader fails on them. This module saves
/// `alpha` = α·bs (alpha/r then equals the full-rank forward's α/(r/bs)) and a 4-D
/// (out, r, 1…) `lora_up.weight` for convolutions.
public struct DyLoRA: MultiplierInFactors {
    public static let algorithm = Algorithm.dylora
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let alpha: Float
    public let blockSize: Int
    public var blockCount: Int { parameters.required("lora_up.weight").shape[1] / blockSize }
    public var rank: Int? { parameters.required("lora_up.weight").shape[1] }
    /// The full-rank scale α/(r/bs).
    public var scale: Float { alpha / Float(blockCount) }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        guard options.rank % options.blockSize == 0 else {
            throw AdapterError("dylora: rank \(options.rank) is not a multiple of block_size \(options.blockSize)")
        }
        self.layer = layer
        blockSize = options.blockSize
        alpha = (options.alpha ?? 0) == 0 ? Float(options.rank) : options.alpha!
        let r = options.rank
        var p = ParameterSet()
        // LyCORIS initialises each (bs, in·K) down block with its own fan-in, which is the
        // same bound as the concatenated matrix's.
        p["lora_down.weight"] = .kaimingUniform([r, layer.weightInFeatures] + layer.kernelSize, using: &random)
        p["lora_up.weight"] = .zeros([layer.outFeatures, r])
        parameters = p
    }

    /// The per-step scale α/(b+1).
    public func scale(block b: Int) -> Float { alpha / Float(b + 1) }

    /// The block of this step: the context's, or every block (eval); throws when outside 0..<blockCount.
    package func block(_ requested: Int?) throws -> Int {
        let b = requested ?? blockCount - 1
        guard b >= 0 && b < blockCount else { throw AdapterError("dylora: block \(b) is outside 0..<\(blockCount)") }
        return b
    }

    private var up: Tensor { parameters.required("lora_up.weight") }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), block: try block(context.block), multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient, block: try block(context.block),
                                         multiplier: 1))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// m·ΔW_b = m·α/(b+1) · up[:, :(b+1)·bs] · down[:(b+1)·bs] (weight shape); `b` checked by ``block(_:)``.
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, block b: Int, multiplier m: Float) -> A.Value {
        let used = 0..<((b + 1) * blockSize)
        let up = algebra.matrix(p.required("lora_up.weight")), down = algebra.matrix(p.required("lora_down.weight"))
        return algebra.reshaped(algebra.matmul(algebra.columns(up, used), transposeA: false, algebra.rows(down, used),
                                               transposeB: false, alpha: m * scale(block: b)),
                                layer.weightShape)
    }

    /// ∂parameters from G = ∂(m·ΔW_b): only block b's columns of up and rows of down get
    /// gradient, s = m·α/(b+1): ∂up[:, block] = s·G·down[block]ᵀ, ∂down[block] = s·up[:, block]ᵀ·G.
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradient: A.Value, block b: Int,
                                                       multiplier m: Float) -> [(String, A.Value)] {
        let trained = (b * blockSize)..<((b + 1) * blockSize)
        let downShape = algebra.shape(of: p.required("lora_down.weight"))
        let up = algebra.matrix(p.required("lora_up.weight")), down = algebra.matrix(p.required("lora_down.weight"))
        let (rank, width) = (algebra.shape(of: up)[1], algebra.shape(of: down)[1])
        let g = algebra.matrix(gradient)
        let s = m * scale(block: b)
        let gradUpBlock = algebra.matmul(g, transposeA: false, algebra.rows(down, trained), transposeB: true, alpha: s)     // (out, bs)
        let gradDownBlock = algebra.matmul(algebra.columns(up, trained), transposeA: true, g, transposeB: false, alpha: s)  // (bs, in·K)
        // down's block rows are one contiguous run of its flat storage.
        let flat = algebra.placing(algebra.reshaped(gradDownBlock, [1, blockSize * width]),
                                   columns: (trained.lowerBound * width)..<(trained.upperBound * width), width: rank * width)
        return [("lora_down.weight", algebra.reshaped(flat, downShape)),
                ("lora_up.weight", algebra.placing(gradUpBlock, columns: trained, width: rank))]
    }

    // MARK: Bypass: a LoRA chain over the used blocks

    private var bypassApplies: Bool {
        if case let .convolution(geometry) = layer { return geometry.groups == 1 }
        return true
    }

    /// r·(in·K + out) per output position (all blocks used).
    public var bypassCost: Int? {
        guard bypassApplies, let r = rank else { return nil }
        return r * (layer.weightInFeatures * layer.kernelElements + layer.outFeatures)
    }

    /// The chain of blocks 0…b with up scaled by `factor` (m·α/(b+1)).
    private func chain(block b: Int, factor: Float) -> OperatorChain {
        let used = (b + 1) * blockSize
        let ones = layer.kernelSize.map { _ in 1 }
        return OperatorChain.lowRank(layer, down: parameters.required("lora_down.weight").slice(axis: 0, 0..<used),
                                     up: (up.slice(axis: 1, 0..<used) * factor).reshaped([layer.outFeatures, used] + ones),
                                     rankMask: nil)
    }

    /// What the chain's stage inputs depend on besides x: down and the block.
    private func stageKey(block b: Int) -> [Tensor] { [parameters.required("lora_down.weight"), Tensor(scalar: Float(b))] }

    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        guard bypassApplies else { return try weightPathForward(x, multiplier: m, context) }
        let b = try block(context.block)
        return chain(block: b, factor: m * scale(block: b)).forward(x, caching: context.stageCache, key: stageKey(block: b))
    }

    /// Through the chain: ∂up = m·α/(b+1)·∂up' and ∂down, each kept on block b's columns /
    /// rows (the earlier blocks are detached).
    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        guard bypassApplies else { return try weightPathBackward(x, gradOutput: gradOutput, multiplier: m, context) }
        let b = try block(context.block)
        let factor = m * scale(block: b)
        let chain = chain(block: b, factor: factor)
        let back = chain.backward(chain.tape(x, cache: context.stageCache, key: stageKey(block: b)),
                                  gradOutput: gradOutput)
        let trained = (b * blockSize)..<((b + 1) * blockSize)
        let down = parameters.required("lora_down.weight")
        var gradDown = Tensor.zeros(down.shape), gradUp = Tensor.zeros(up.shape)
        let width = down.count / down.shape[0]
        gradDown.scalars.replaceSubrange((trained.lowerBound * width)..<(trained.upperBound * width),
                                         with: back.weights[0].scalars[(trained.lowerBound * width)..<(trained.upperBound * width)])
        let (rows, used, r) = (up.shape[0], (b + 1) * blockSize, up.shape[1])
        let gradScaledUp = back.weights[1].scalars
        for row in 0..<rows {
            for column in trained { gradUp.scalars[row * r + column] = factor * gradScaledUp[row * used + column] }
        }
        return (back.input, ParameterSet([("lora_down.weight", gradDown), ("lora_up.weight", gradUp)]))
    }

    public func savedTensors() -> [SavedTensor] {
        let ones = layer.kernelSize.map { _ in 1 }
        return [SavedTensor("alpha", Tensor(scalar: alpha * Float(blockSize)), storage: .float32),
                SavedTensor("lora_up.weight", up.reshaped(up.shape + ones)),
                SavedTensor("lora_down.weight", parameters.required("lora_down.weight"))]
    }
}
