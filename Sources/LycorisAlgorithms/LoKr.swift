import LycorisCore

/// LoKr (LyCORIS `LokrModule`): ΔW = s·σ·kron(W1, W2).
///
/// With (in_m, in_n) = factorization(in), (out_l, out_k) = factorization(out) (swapped
/// with unbalanced_factorization), r = rank, K = Π kernel:
/// - W1 (out_l, in_m) is `lokr_w1`, or `lokr_w1_a` (out_l, r)·`lokr_w1_b` (r, in_m) when
///   decompose_both and r < max(out_l, in_m)/2 and not full_matrix.
/// - W2 (out_k, in_n[, k…]) is `lokr_w2` when r ≥ max(out_k, in_n)/2 or full_matrix;
///   else with Tucker (conv, some k ≠ 1) the rebuild of `lokr_t2` (r, r, k…),
///   `lokr_w2_a` (r, out_k), `lokr_w2_b` (r, in_n); else `lokr_w2_a` (out_k, r)·`lokr_w2_b`
///   (r, in_n·K) reshaped.
/// - When both halves are full, α is forced to r (s = 1, or 1/√r·√r with rs_lora).
/// Init: w1, w1_a, w1_b, w2_a, t2 kaiming-uniform(a=√5); w2 or w2_b zeros (kaiming with
/// use_scalar).
/// Bypass (linear, and convolutions without groups): Δ(x) = s·σ·vec(W1·X·W2ᵀ) with x's
/// channels viewed as X (in_m, in_n), W2 applied as the layer's op — the Kronecker product
/// is never built.
public struct LoKr: MultiplierInFactors {
    public static let algorithm = Algorithm.lokr
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let scale: Float
    public let savedAlpha: Float
    /// (out_l, in_m) and (out_k, in_n).
    public let w1Shape: [Int], w2Shape: [Int]
    public let rank: Int?

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        self.layer = layer
        let r = options.rank
        let (inM, inN) = factorization(layer.weightInFeatures, factor: options.factor)
        var (outL, outK) = factorization(layer.outFeatures, factor: options.factor)
        if options.unbalancedFactorization { swap(&outL, &outK) }
        w1Shape = [outL, inM]
        w2Shape = [outK, inN]
        let kernel = layer.kernelSize
        let tucker = options.useTucker && kernel.contains { $0 != 1 }
        let w1Full = !(options.decomposeBoth && Float(r) < Float(max(outL, inM)) / 2 && !options.fullMatrix)
        let w2Full = Float(r) >= Float(max(outK, inN)) / 2 || options.fullMatrix
        var p = ParameterSet()
        // LyCORIS's initialisation order: w2 side, then w1 side.
        if w2Full {
            let shape = [outK, inN] + kernel
            p["lokr_w2"] = options.useScalar ? .kaimingUniform(shape, using: &random) : .zeros(shape)
        } else {
            let (aShape, bShape) = tucker ? ([r, outK], [r, inN]) : ([outK, r], [r, inN * layer.kernelElements])
            if tucker { p["lokr_t2"] = .kaimingUniform([r, r] + kernel, using: &random) }
            p["lokr_w2_a"] = .kaimingUniform(aShape, using: &random)
            p["lokr_w2_b"] = options.useScalar ? .kaimingUniform(bShape, using: &random) : .zeros(bShape)
        }
        if w1Full {
            p["lokr_w1"] = .kaimingUniform([outL, inM], using: &random)
        } else {
            p["lokr_w1_a"] = .kaimingUniform([outL, r], using: &random)
            p["lokr_w1_b"] = .kaimingUniform([r, inM], using: &random)
        }
        if options.useScalar { p["scalar"] = Tensor(scalar: 0) }
        parameters = p
        rank = w1Full && w2Full ? nil : r
        let alpha: Float? = w1Full && w2Full ? Float(r) : options.alpha
        let rule = ScaleRule(alpha: alpha, rank: r, rsLoRA: options.rsLoRA)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
    }

    /// A module from a file's tensors; r is read from `lokr_w1_b` or `lokr_w2_b`
    /// (first axis), scale = alpha/r, and 1 when both halves are full.
    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        self.layer = layer
        var p = ParameterSet()
        let kernel = layer.kernelSize
        let w1: [Int]
        if let full = tensors["lokr_w1"] {
            guard full.rank == 2 else { throw AdapterError("lokr: lokr_w1 must be a matrix, got \(full.shape)") }
            w1 = full.shape
            p["lokr_w1"] = full
        } else if let a = tensors["lokr_w1_a"], let b = tensors["lokr_w1_b"], a.rank == 2, b.rank == 2, a.shape[1] == b.shape[0] {
            w1 = [a.shape[0], b.shape[1]]
            p["lokr_w1_a"] = a
            p["lokr_w1_b"] = b
        } else {
            throw AdapterError("lokr: needs lokr_w1, or lokr_w1_a (out_l, r) with lokr_w1_b (r, in_m)")
        }
        let outK = w1[0] > 0 ? layer.outFeatures / w1[0] : 0
        let inN = w1[1] > 0 ? layer.weightInFeatures / w1[1] : 0
        guard outK * w1[0] == layer.outFeatures, inN * w1[1] == layer.weightInFeatures else {
            throw AdapterError("lokr: W1 \(w1) does not divide the layer's weight \(layer.weightShape)")
        }
        if let full = tensors["lokr_w2"] {
            try Self.expectShape(full, [outK, inN] + kernel, "lokr_w2")
            p["lokr_w2"] = full
        } else if let a = tensors["lokr_w2_a"], let b = tensors["lokr_w2_b"] {
            let r = b.shape.first ?? 0
            if let t = tensors["lokr_t2"] {
                try Self.expectShape(t, [r, r] + kernel, "lokr_t2")
                try Self.expectShape(a, [r, outK], "lokr_w2_a")
                try Self.expectShape(b, [r, inN], "lokr_w2_b")
                p["lokr_t2"] = t
            } else {
                try Self.expectShape(a, [outK, r], "lokr_w2_a")
                try Self.expectShape(b, [r, inN * layer.kernelElements], "lokr_w2_b")
            }
            p["lokr_w2_a"] = a
            p["lokr_w2_b"] = b
        } else {
            throw AdapterError("lokr: needs lokr_w2, or lokr_w2_a with lokr_w2_b")
        }
        w1Shape = w1
        w2Shape = [outK, inN]
        parameters = p
        let fileRank = tensors["lokr_w1_b"]?.shape.first ?? tensors["lokr_w2_b"]?.shape.first
        rank = fileRank
        if let fileRank {
            let rule = ScaleRule(fileAlpha: alpha, rank: fileRank)
            scale = rule.scale
            savedAlpha = rule.savedAlpha
        } else {
            scale = 1
            savedAlpha = alpha ?? 1
        }
    }

    private var w1: Tensor { w1(TensorAlgebra(), Factors(parameters)) }

    /// W2 with kernel axes: (out_k, in_n, k…).
    private var w2: Tensor { w2(TensorAlgebra(), Factors(parameters)) }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient, multiplier: 1))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// W1 (out_l, in_m): `lokr_w1`, or `lokr_w1_a`·`lokr_w1_b`.
    private func w1<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>) -> A.Value {
        if let full = p["lokr_w1"] { return full }
        return algebra.matmul(p.required("lokr_w1_a"), p.required("lokr_w1_b"))
    }

    /// W2 with kernel axes (out_k, in_n, k…): `lokr_w2`, the Tucker rebuild, or `lokr_w2_a`·`lokr_w2_b`.
    private func w2<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>) -> A.Value {
        if let full = p["lokr_w2"] { return full }
        let a = p.required("lokr_w2_a"), b = p.required("lokr_w2_b")
        if let core = p["lokr_t2"] { return TuckerProduct.rebuild(algebra, core: core, a: a, b: b) }
        return algebra.reshaped(algebra.matmul(a, b), w2Shape + layer.kernelSize)
    }

    /// m·ΔW = m·s·σ·kron(W1, W2) (weight shape).
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, multiplier m: Float) -> A.Value {
        algebra.kronecker(w1(algebra, p), w2(algebra, p), scale: m * scale * p.scalar(algebra))
    }

    /// ∂parameters from G = ∂(m·ΔW): ∂W1, ∂W2 of f·kron(W1, W2) (f = m·s·σ) chained to the stored
    /// factors; ∂σ = m·s·⟨G, kron(W1, W2)⟩.
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradient: A.Value,
                                                       multiplier m: Float) -> [(String, A.Value)] {
        let (w1, w2) = (w1(algebra, p), w2(algebra, p))
        let (gradW1, gradW2) = algebra.kroneckerBackward(gradient, w1, w2, scale: m * scale * p.scalar(algebra))
        var grads = factorGradients(algebra, p, gradW1: gradW1, gradW2: gradW2)
        if p["scalar"] != nil {
            grads.append(("scalar", algebra.dot(gradient, algebra.kronecker(w1, w2, scale: 1), scale: m * scale)))
        }
        return grads
    }

    /// Chains ∂W1 and ∂W2 (kernel-shaped) to the stored factors.
    private func factorGradients<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradW1: A.Value,
                                                   gradW2: A.Value) -> [(String, A.Value)] {
        w1Gradients(algebra, p, gradW1: gradW1) + w2Gradients(algebra, p, gradW2: gradW2)
    }

    /// ∂W1 (out_l, in_m) chained to `lokr_w1`, or to `lokr_w1_a` and `lokr_w1_b`.
    private func w1Gradients<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradW1: A.Value) -> [(String, A.Value)] {
        if p["lokr_w1"] != nil { return [("lokr_w1", gradW1)] }
        let a = p.required("lokr_w1_a"), b = p.required("lokr_w1_b")
        return [("lokr_w1_a", algebra.matmul(gradW1, b, transposeB: true)), ("lokr_w1_b", algebra.matmul(a, transposeA: true, gradW1))]
    }

    /// ∂W2 (kernel-shaped) chained to `lokr_w2`, the Tucker factors, or `lokr_w2_a` and `lokr_w2_b`.
    private func w2Gradients<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradW2: A.Value) -> [(String, A.Value)] {
        if p["lokr_w2"] != nil { return [("lokr_w2", gradW2)] }
        let a = p.required("lokr_w2_a"), b = p.required("lokr_w2_b")
        if let core = p["lokr_t2"] {
            let g = TuckerProduct.backward(algebra, gradW2, core: core, a: a, b: b)
            return [("lokr_t2", g.core), ("lokr_w2_a", g.a), ("lokr_w2_b", g.b)]
        }
        let gm = algebra.matrix(gradW2)
        return [("lokr_w2_a", algebra.matmul(gm, b, transposeB: true)), ("lokr_w2_b", algebra.matmul(a, transposeA: true, gm))]
    }

    // MARK: Bypass

    /// Linear layers and ungrouped convolutions: the input's channels split as
    /// (in_m, in_n), so kron(W1, W2) applies as W2 on each of the in_m channel groups, then
    /// W1 across groups.
    private var hasBypassPath: Bool {
        if case let .convolution(geometry) = layer { return geometry.groups == 1 }
        return true
    }

    /// W2 on each of the in_m channel groups (in_m·out_k·in_n·K, or in_m·r·(in_n·K + out_k)
    /// through ``w2Split``), then W1 across groups (out_l·in_m·out_k).
    public var bypassCost: Int? {
        guard hasBypassPath else { return nil }
        return w1Shape[1] * w2OpCost + w1Shape[0] * w1Shape[1] * w2Shape[0]
    }

    /// Multiply-adds per position of W2's op on one channel group.
    private var w2OpCost: Int {
        let full = w2Shape[0] * w2Shape[1] * layer.kernelElements
        guard layer.isConvolution, parameters["lokr_t2"] == nil, let r = parameters["lokr_w2_b"]?.shape[0] else { return full }
        return Swift.min(full, r * (w2Shape[1] * layer.kernelElements + w2Shape[0]))
    }

    /// A convolution's W2 = `lokr_w2_a`·`lokr_w2_b` (no Tucker) applied as its two factors
    /// when that costs fewer multiply-adds: `lokr_w2_b` as the op with r outputs, then
    /// `lokr_w2_a` pointwise (a LoCon-shaped chain); nil: W2 applies whole.
    private var w2Split: OperatorChain? {
        guard layer.isConvolution, parameters["lokr_t2"] == nil, let a = parameters["lokr_w2_a"], let b = parameters["lokr_w2_b"],
              w2OpCost < w2Shape[0] * w2Shape[1] * layer.kernelElements else { return nil }
        let r = b.shape[0]
        let ones = [Int](repeating: 1, count: layer.kernelSize.count)
        return OperatorChain.lowRank(innerOp, down: b.reshaped([r, w2Shape[1]] + layer.kernelSize), up: a.reshaped([w2Shape[0], r] + ones),
                                     rankMask: nil)
    }

    /// The op W2 applies to one channel group: in_n → out_k with the layer's geometry.
    private var innerOp: LayerSpec {
        switch layer {
        case .linear: .linear(inFeatures: w2Shape[1], outFeatures: w2Shape[0])
        case let .convolution(geometry): .convolution(geometry.with(inChannels: w2Shape[1], outChannels: w2Shape[0]))
        case .norm: preconditionFailure("lokr does not adapt norm layers (Algorithm.makeAdapter refuses them)")
        }
    }

    /// W1 across the groups of a convolution's output: per sample, (in_m, out_k·P) →
    /// (out_l, out_k·P), a pointwise conv1d over the sample's (in_m, out_k·P) view.
    private var groupMixing: LayerSpec {
        .convolution(.pointwise(inChannels: w1Shape[1], outChannels: w1Shape[0], spatialRank: 1))
    }

    /// What Z = op₂(grouped x, W2) depends on besides x: W2's factors.
    private var stageKey: [Tensor] {
        ["lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"].compactMap { parameters[$0] }
    }

    /// A convolution's input x (N, in_m·in_n, …) as (N·in_m, in_n, …): W2's op per group.
    private func grouped(_ x: Tensor) -> Tensor { x.reshaped([-1, w2Shape[1]] + Array(x.shape[2...])) }

    /// m·Δ(x) with W1' = m·s·σ·W1 (the scale rides on the small factor, not on the
    /// activation). Linear: ``KroneckerRows`` (each row viewed as X (in_m, in_n) maps to
    /// vec(W1'·X·W2ᵀ)). Convolution: Z = op₂(x as (N·in_m, in_n, …), W2) (through
    /// ``w2Split`` where cheaper), viewed as (N, in_m, out_k·P), then Y[n] = W1'·Z[n]
    /// (N, out_l·out_k, P) — no transposes; Z (and the split's stage inputs) stay on the
    /// step's tape for the backward.
    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        guard hasBypassPath else { return try weightPathForward(x, multiplier: m, context) }
        let scaledW1 = w1 * (m * scale * parameters.scalar)
        guard layer.isConvolution else {
            return KroneckerRows.forward(x.reshaped([-1, x.shape[x.rank - 1]]), w1: scaledW1, w2: w2.flattenedToMatrix())
                .reshaped(layer.outputShape(forInput: x.shape))
        }
        let (z, stageInputs) = w2Split?.forward(grouped(x)) ?? (innerOp.apply(grouped(x), weight: w2), [])
        context.stageCache.store(stageInputs + [z], for: [x] + stageKey)
        return groupMixing.apply(z.reshaped([x.shape[0], w1Shape[1], -1]), weight: scaledW1.reshaped(w1Shape + [1]))
            .reshaped(layer.outputShape(forInput: x.shape))
    }

    /// With W1' = m·s·σ·W1: ∂W1 = m·s·σ·∂W1', ∂σ = m·s·⟨∂W1', W1⟩. Linear: ``KroneckerRows``'s
    /// backward. Convolution, with ∂Y (N, out_l, out_k·P): ∂W1' = Σₙ ∂Y[n]·Z[n]ᵀ (Z from the
    /// forward's tape, or computed again), ∂Z[n] = W1'ᵀ·∂Y[n], then W2's op backward (the
    /// split chain's, giving ∂`lokr_w2_a` and ∂`lokr_w2_b` directly).
    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        guard hasBypassPath else { return try weightPathBackward(x, gradOutput: gradOutput, multiplier: m, context) }
        let (w1, w2) = (w1, w2)
        let factor = m * scale * parameters.scalar
        let scaledW1 = w1 * factor
        let algebra = TensorAlgebra(), p = Factors(parameters)
        let gradInput: Tensor, gradScaledW1: Tensor, w2Grads: [(String, Tensor)]
        if layer.isConvolution {
            let grouped = grouped(x)
            let cached = context.stageCache.stageInputs(for: [x] + stageKey)
            let split = w2Split
            // Z, and the split chain's stage inputs (grouped x, h) when W2 applies as two factors.
            let (z, stageInputs): (Tensor, [Tensor]) = if let cached {
                (cached[cached.count - 1], Array(cached.dropLast()))
            } else if let split {
                split.forward(grouped)
            } else {
                (innerOp.apply(grouped, weight: w2), [])
            }
            let (zs, gys) = (z.reshaped([x.shape[0], w1Shape[1], -1]), gradOutput.reshaped([x.shape[0], w1Shape[0], -1]))
            gradScaledW1 = groupMixing.backwardWeight(zs, gradOutput: gys).reshaped(w1Shape)
            let gradZ = groupMixing.backwardInput(gys, weight: scaledW1.reshaped(w1Shape + [1]), inputShape: zs.shape)
                .reshaped(z.shape)
            if let split {
                let back = split.backward(stageInputs: stageInputs, gradOutput: gradZ)
                gradInput = back.input.reshaped(x.shape)
                w2Grads = [("lokr_w2_a", back.weights[1].reshaped(parameters.required("lokr_w2_a").shape)),
                           ("lokr_w2_b", back.weights[0].reshaped(parameters.required("lokr_w2_b").shape))]
            } else {
                let gradW2 = innerOp.backwardWeight(grouped, gradOutput: gradZ)
                gradInput = innerBackwardInput(gradZ, w2: w2, inputShape: grouped.shape).reshaped(x.shape)
                w2Grads = w2Gradients(algebra, p, gradW2: gradW2)
            }
        } else {
            let rows = x.reshaped([-1, x.shape[x.rank - 1]])
            let back = KroneckerRows.backward(rows, gradOutput: gradOutput.reshaped([rows.shape[0], -1]),
                                              w1: scaledW1, w2: w2.flattenedToMatrix())
            (gradInput, gradScaledW1) = (back.input.reshaped(x.shape), back.w1)
            w2Grads = w2Gradients(algebra, p, gradW2: back.w2.reshaped(w2.shape))
        }
        var grads = ParameterSet(w1Gradients(algebra, p, gradW1: gradScaledW1 * factor) + w2Grads)
        if parameters["scalar"] != nil { grads["scalar"] = Tensor(scalar: m * scale * gradScaledW1.dot(w1)) }
        return (gradInput, grads)
    }

    /// ∂(grouped x) of W2's op: a forward convolution with W2's kernel flipped where the
    /// convolution has stride 1 (no col2im), else the op's backward.
    private func innerBackwardInput(_ gradZ: Tensor, w2: Tensor, inputShape: [Int]) -> Tensor {
        if case let .convolution(geometry) = innerOp,
           let gradInput = Convolution.backwardInputByFlippedKernel(gradZ, weight: w2, geometry: geometry, inputShape: inputShape) {
            return gradInput
        }
        return innerOp.backwardInput(gradZ, weight: w2, inputShape: inputShape)
    }

    public func savedTensors() -> [SavedTensor] {
        var saved = [SavedTensor("alpha", Tensor(scalar: savedAlpha), storage: .float32)]
        let sigma = parameters.scalar
        if let full = parameters["lokr_w1"] {
            saved.append(SavedTensor("lokr_w1", full * sigma))
        } else {
            saved.append(SavedTensor("lokr_w1_a", parameters.required("lokr_w1_a") * sigma))
            saved.append(SavedTensor("lokr_w1_b", parameters.required("lokr_w1_b")))
        }
        for name in ["lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"] {
            if let tensor = parameters[name] { saved.append(SavedTensor(name, tensor)) }
        }
        return saved
    }
}
