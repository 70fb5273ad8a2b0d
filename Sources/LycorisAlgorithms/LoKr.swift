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
public struct LoKr: AdapterAlgorithm {
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
        var grads: [(String, A.Value)] = []
        if p["lokr_w1"] != nil {
            grads.append(("lokr_w1", gradW1))
        } else {
            let a = p.required("lokr_w1_a"), b = p.required("lokr_w1_b")
            grads += [("lokr_w1_a", algebra.matmul(gradW1, b, transposeB: true)),
                      ("lokr_w1_b", algebra.matmul(a, transposeA: true, gradW1))]
        }
        if p["lokr_w2"] != nil {
            grads.append(("lokr_w2", gradW2))
        } else {
            let a = p.required("lokr_w2_a"), b = p.required("lokr_w2_b")
            if let core = p["lokr_t2"] {
                let g = TuckerProduct.backward(algebra, gradW2, core: core, a: a, b: b)
                grads += [("lokr_t2", g.core), ("lokr_w2_a", g.a), ("lokr_w2_b", g.b)]
            } else {
                let gm = algebra.matrix(gradW2)
                grads += [("lokr_w2_a", algebra.matmul(gm, b, transposeB: true)),
                          ("lokr_w2_b", algebra.matmul(a, transposeA: true, gm))]
            }
        }
        return grads
    }

    // MARK: Bypass

    /// Linear layers and ungrouped convolutions: the input's channels split as
    /// (in_m, in_n), so kron(W1, W2) applies as W2 on each of the in_m channel groups, then
    /// W1 across groups.
    private var hasBypassPath: Bool {
        if case let .convolution(geometry) = layer { return geometry.groups == 1 }
        return true
    }

    /// W2 on each of the in_m channel groups (in_m·out_k·in_n·K), then W1 across groups
    /// (out_l·in_m·out_k).
    public var bypassCost: Int? {
        guard hasBypassPath else { return nil }
        return w1Shape[1] * w2Shape[0] * w2Shape[1] * layer.kernelElements + w1Shape[0] * w1Shape[1] * w2Shape[0]
    }

    /// The op W2 applies to one channel group: in_n → out_k with the layer's geometry.
    private var innerOp: LayerSpec {
        switch layer {
        case .linear: .linear(inFeatures: w2Shape[1], outFeatures: w2Shape[0])
        case let .convolution(geometry): .convolution(geometry.with(inChannels: w2Shape[1], outChannels: w2Shape[0]))
        case .norm: preconditionFailure("lokr does not adapt norm layers (Algorithm.makeAdapter refuses them)")
        }
    }

    /// Δ(x) without scale, never building kron(W1, W2):
    /// Z = op₂(x viewed as (n·in_m, in_n, …), W2) → (n, in_m, out_k·P);
    /// Y[n, a, (b, p)] = Σ_m W1[a, m]·Z[n, m, (b, p)] → the output (n, out, …).
    /// Returns Y, the grouped input and Z as (in_m, n·out_k·P) for the backward pass.
    private func kroneckerApply(_ x: Tensor, w1: Tensor, w2: Tensor) -> (output: Tensor, groupedInput: Tensor, z: Tensor) {
        let (outL, inM) = (w1Shape[0], w1Shape[1])
        let rows = x.shape[0]
        let grouped = x.reshaped([-1, w2Shape[1]] + (layer.isConvolution ? Array(x.shape[2...]) : []))
        let z = innerOp.apply(grouped, weight: w2)
        let width = z.count / (rows * inM)
        let zm = z.reshaped([rows, inM, width]).permuted([1, 0, 2]).reshaped([inM, rows * width])
        let y = Tensor.matmul(w1, zm).reshaped([outL, rows, width]).permuted([1, 0, 2])
        return (y.reshaped(layer.outputShape(forInput: x.shape)), grouped, zm)
    }

    public func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        guard hasBypassPath else { return layer.apply(x, weight: try deltaWeight(context)) }
        return kroneckerApply(x.reshaped(rowsFirst(x)), w1: w1, w2: w2).output.reshaped(layer.outputShape(forInput: x.shape))
            * (scale * parameters.scalar)
    }

    public func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        guard hasBypassPath else {
            let delta = try deltaWeight(context)
            return (layer.backwardInput(gradOutput, weight: delta, inputShape: x.shape),
                    try deltaWeightBackward(layer.backwardWeight(x, gradOutput: gradOutput), context))
        }
        let (w1, w2) = (w1, w2)
        let (outL, inM) = (w1Shape[0], w1Shape[1])
        let input = x.reshaped(rowsFirst(x))
        let rows = input.shape[0]
        let (raw, grouped, zm) = kroneckerApply(input, w1: w1, w2: w2)
        let width = zm.count / (rows * inM)
        let factor = scale * parameters.scalar
        // ∂Y as (out_l, n·out_k·P).
        let gy = (gradOutput * factor).reshaped([rows, outL, width]).permuted([1, 0, 2]).reshaped([outL, rows * width])
        let gradW1 = Tensor.matmul(gy, zm, transposeB: true)
        let gz = Tensor.matmul(w1, transposeA: true, gy).reshaped([inM, rows, width]).permuted([1, 0, 2])
        let zShape = innerOp.outputShape(forInput: grouped.shape)
        let gradZ = gz.reshaped(zShape)
        let gradW2 = innerOp.backwardWeight(grouped, gradOutput: gradZ).reshaped(w2.shape)
        let gradInput = innerOp.backwardInput(gradZ, weight: w2, inputShape: grouped.shape).reshaped(x.shape)
        var grads = ParameterSet(factorGradients(TensorAlgebra(), Factors(parameters), gradW1: gradW1, gradW2: gradW2))
        if parameters["scalar"] != nil { grads["scalar"] = Tensor(scalar: scale * gradOutput.reshaped(raw.shape).dot(raw)) }
        return (gradInput, grads)
    }

    /// x with its leading axes merged into one row axis for linear inputs (…, in);
    /// conv inputs (N, C, spatial…) are kept.
    private func rowsFirst(_ x: Tensor) -> [Int] {
        layer.isConvolution ? x.shape : [-1, x.shape[x.rank - 1]]
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
