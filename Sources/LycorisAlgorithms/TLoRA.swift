import LycorisCore

/// T-LoRA (LyCORIS `TLoraModule`, timestep-dependent LoRA): a LoRA whose factors start as
/// singular vectors of the base weight, with trainable singular values and a rank mask set
/// per step from the diffusion timestep, minus the same product of the frozen initial
/// factors, so that a fresh module changes nothing.
///
/// Shapes (r = rank, W0 seen as (out, in·K), K = Π kernel): `q_layer.weight` Q (r, in) on a
/// Linear, (r, in/g, k…) on a convolution; `p_layer.weight` P (out, r), (out, r, 1…) on a
/// convolution; `lambda_layer` λ (1, r). (LyCORIS 4.1.3 makes Q a 1×1 kernel (r, in, 1…)
/// on every convolution — the first `in` columns of the singular vectors — and crashes on
/// kernels larger than 1 or groups > 1; this project keeps Q's whole kernel, as LoCon's
/// `lora_down`, which is the same module where LyCORIS works.)
///
/// ΔW = s·(P·diag(λ ⊙ μ)·Q − P₀·diag(λ₀ ⊙ μ)·Q₀), s = α/r (α = r when nil or 0); μ (r,) is
/// the timestep mask (``DeltaContext/timestepMask``: its first r entries, padded with 1s;
/// none: all 1s). The multiplier scales ΔW; rank dropout does not apply (LyCORIS's T-LoRA
/// has none). Bypass: op(x, ΔW), which LyCORIS's factor path equals.
/// Init (`sig_type`, `use_data_init`): the thin SVD U·diag(S)·Vᵀ of W0 (or, without data
/// init, of a (out, in·K) matrix drawn from N(0, 1/r²)); the r components selected —
/// `principal` the first, `last` the final, `middle` those from ⌊(k − r)/2⌋ (Python slice
/// rules) — give P = U[:, sel], λ = S[sel], Q = Vᵀ[sel]; missing components are zeros
/// with λ = 1e-6. P₀, λ₀, Q₀ are these initial values, frozen; files do not store them: a
/// loaded module takes them from the principal SVD of W0 (what LyCORIS's loader does).
/// Backward, with G = s·∂ΔW and Λ = diag(λ ⊙ μ): ∂P = G·(Λ·Q)ᵀ, ∂Q = Λ·Pᵀ·G,
/// ∂λᵢ = μᵢ·Σⱼ (Pᵀ·G)ᵢⱼ·Qᵢⱼ.
/// Files: `q_layer.weight`, `p_layer.weight`, `lambda_layer`, `alpha`.
public struct TLoRA: AdapterAlgorithm {
    public static let algorithm = Algorithm.tlora
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let scale: Float
    /// α as saved (r where the option was nil or 0).
    public let alpha: Float
    /// The frozen initial factors of the residual term, as matrices.
    let initial: SingularFactors
    public var rank: Int? { initial.lambda.count }

    /// P (out, r), λ (r,) and Q (r, in·K).
    struct SingularFactors: Sendable {
        var p: Tensor
        var lambda: Tensor
        var q: Tensor
    }

    /// The components of W0's SVD that `selection` picks.
    public enum Selection: String, Sendable, CaseIterable {
        case principal, last, middle
    }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        throw AdapterError("tlora needs the base layer's weight (its factors start as W0's singular vectors)")
    }

    /// A fresh module on `layer` with base weight `baseWeight`.
    public init(layer: LayerSpec, options: AdapterOptions, baseWeight: Tensor, random: inout RandomSource) throws {
        guard let selection = Selection(rawValue: options.sigType) else {
            throw AdapterError("tlora: sig_type must be principal, last or middle, not \(options.sigType)")
        }
        let r = options.rank
        let shape = [layer.outFeatures, layer.weightInFeatures * layer.kernelElements]
        let source = options.useDataInit ? baseWeight.reshaped(shape) : .normal(shape, std: 1 / Float(r), using: &random)
        let initial = try Self.singularFactors(source, rank: r, selection: selection)
        let alpha = (options.alpha ?? 0) == 0 ? Float(r) : options.alpha!
        self.init(layer: layer, p: initial.p, lambda: initial.lambda, q: initial.q, alpha: alpha, initial: initial)
    }

    /// A module from a file's tensors; the frozen factors come from W0's principal SVD.
    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?, baseWeight: Tensor) throws {
        guard let q = tensors["q_layer.weight"], let p = tensors["p_layer.weight"], let lambda = tensors["lambda_layer"] else {
            throw AdapterError("tlora: q_layer.weight, p_layer.weight and lambda_layer are all required")
        }
        let r = q.shape.first ?? 0
        guard r > 0 else { throw AdapterError("tlora: q_layer.weight has shape \(q.shape), expected a positive rank first") }
        try Self.expectShape(q, Self.qShape(layer, rank: r), "q_layer.weight")
        try Self.expectShape(p, Self.pShape(layer, rank: r), "p_layer.weight")
        try Self.expectShape(lambda, [1, r], "lambda_layer")
        let shape = [layer.outFeatures, layer.weightInFeatures * layer.kernelElements]
        let initial = try Self.singularFactors(baseWeight.reshaped(shape), rank: r, selection: .principal)
        let effective = (alpha ?? 0) == 0 ? Float(r) : alpha!
        self.init(layer: layer, p: p.flattenedToMatrix(), lambda: lambda.reshaped([r]), q: q.flattenedToMatrix(),
                  alpha: effective, initial: initial)
    }

    private init(layer: LayerSpec, p: Tensor, lambda: Tensor, q: Tensor, alpha: Float, initial: SingularFactors) {
        self.layer = layer
        let r = lambda.count
        self.alpha = alpha
        scale = alpha / Float(r)
        self.initial = initial
        parameters = ParameterSet([("q_layer.weight", q.reshaped(Self.qShape(layer, rank: r))),
                                   ("p_layer.weight", p.reshaped(Self.pShape(layer, rank: r))),
                                   ("lambda_layer", lambda.reshaped([1, r]))])
    }

    static func qShape(_ layer: LayerSpec, rank r: Int) -> [Int] { [r] + layer.weightShape.dropFirst() }

    static func pShape(_ layer: LayerSpec, rank r: Int) -> [Int] { [layer.outFeatures, r] + layer.kernelSize.map { _ in 1 } }

    /// P, λ, Q from the thin SVD of `matrix` (out, in·K), padded to rank r.
    static func singularFactors(_ matrix: Tensor, rank r: Int, selection: Selection) throws -> SingularFactors {
        guard matrix.isFinite, let svd = try? matrix.doublePrecisionSingularValueDecomposition() else {
            throw AdapterError("tlora: the SVD of the base weight failed (is it finite?)")
        }
        let k = svd.s.count
        let start: Int
        switch selection {
        case .principal: start = 0
        case .last: start = -r
        case .middle: start = Int((Double(k - r) / 2).rounded(.down))
        }
        // Python's slice [start : start + r] on k items.
        func clamp(_ i: Int) -> Int { i < 0 ? max(i + k, 0) : min(i, k) }
        let (low, high) = (clamp(start), selection == .last ? k : clamp(start + r))
        let picked = Array(low..<max(low, high))
        let (out, columns) = (matrix.shape[0], matrix.shape[1])
        var p = Tensor.zeros([out, r]), q = Tensor.zeros([r, columns])
        var lambda = Tensor(repeating: 1e-6, shape: [r])
        for (j, component) in picked.enumerated() {
            for i in 0..<out { p.scalars[i * r + j] = svd.u.scalars[i * k + component] }
            q.scalars.replaceSubrange((j * columns)..<((j + 1) * columns),
                                      with: svd.vt.scalars[(component * columns)..<((component + 1) * columns)])
            lambda.scalars[j] = svd.s[component]
        }
        return SingularFactors(p: p, lambda: lambda, q: q)
    }

    /// μ (r,): the given mask cut or padded with 1s to r (none: all 1s).
    package func mask(_ given: Tensor?) -> Tensor {
        let r = initial.lambda.count
        guard let given else { return Tensor(repeating: 1, shape: [r]) }
        return Tensor(shape: [r], scalars: (0..<r).map { $0 < given.count ? given.scalars[$0] : 1 })
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), timestepMask: context.timestepMask, multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient,
                                         timestepMask: context.timestepMask, multiplier: 1))
    }

    /// m·ΔW: LyCORIS's T-LoRA has no rank dropout, so the row mask is not applied.
    public func multipliedDeltaWeight(_ m: Float, rowMask: Tensor?, _ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), timestepMask: context.timestepMask, multiplier: m)
    }

    public func multipliedDeltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, multiplier m: Float,
                                              rowMask: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient,
                                         timestepMask: context.timestepMask, multiplier: m))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// P (out, r), λ (r,), Q (r, in·K) of the trained factors as matrices.
    private func trained<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>) -> (p: A.Value, lambda: A.Value, q: A.Value) {
        (algebra.matrix(p.required("p_layer.weight")), algebra.reshaped(p.required("lambda_layer"), [initial.lambda.count]),
         algebra.matrix(p.required("q_layer.weight")))
    }

    /// P·diag(λ ⊙ μ)·Q (out, in·K).
    private func product<A: WeightAlgebra>(_ algebra: A, p: A.Value, lambda: A.Value, q: A.Value, mask: A.Value) -> A.Value {
        algebra.matmul(p, algebra.scalingRows(q, by: algebra.hadamard(lambda, mask, scale: 1)))
    }

    /// m·ΔW = m·s·(P·diag(λ ⊙ μ)·Q − P₀·diag(λ₀ ⊙ μ)·Q₀) (weight shape); μ from `timestepMask`
    /// (``mask(_:)``); the frozen P₀, λ₀, Q₀ enter as ``WeightAlgebra/constant(_:)``s.
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, timestepMask: Tensor?,
                                               multiplier m: Float) -> A.Value {
        let mu = algebra.constant(mask(timestepMask))
        let f = trained(algebra, p)
        let current = product(algebra, p: f.p, lambda: f.lambda, q: f.q, mask: mu)
        let frozen = product(algebra, p: algebra.constant(initial.p), lambda: algebra.constant(initial.lambda),
                             q: algebra.constant(initial.q), mask: mu)
        return algebra.reshaped(algebra.scaled(algebra.adding(current, algebra.scaled(frozen, by: -1)), by: m * scale),
                                layer.weightShape)
    }

    /// ∂parameters from ∂(m·ΔW): with G = m·s·∂(m·ΔW), Λ = diag(λ ⊙ μ): ∂P = G·(Λ·Q)ᵀ,
    /// ∂Q = Λ·Pᵀ·G, ∂λᵢ = μᵢ·Σⱼ (Pᵀ·G)ᵢⱼ·Qᵢⱼ (summed in double).
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradient: A.Value,
                                                       timestepMask: Tensor?, multiplier m: Float) -> [(String, A.Value)] {
        let mu = algebra.constant(mask(timestepMask))
        let f = trained(algebra, p)
        let r = initial.lambda.count
        let g = algebra.scaled(algebra.matrix(gradient), by: m * scale)
        let weights = algebra.hadamard(f.lambda, mu, scale: 1)
        let pg = algebra.matmul(f.p, transposeA: true, g)
        return [
            ("q_layer.weight", algebra.reshaped(algebra.scalingRows(pg, by: weights), Self.qShape(layer, rank: r))),
            ("p_layer.weight", algebra.reshaped(algebra.matmul(g, algebra.scalingRows(f.q, by: weights), transposeB: true),
                                                Self.pShape(layer, rank: r))),
            ("lambda_layer", algebra.reshaped(algebra.hadamard(algebra.rowDots(pg, f.q, scale: 1), mu, scale: 1), [1, r])),
        ]
    }

    public func savedTensors() -> [SavedTensor] {
        [SavedTensor("q_layer.weight", parameters.required("q_layer.weight")),
         SavedTensor("p_layer.weight", parameters.required("p_layer.weight")),
         SavedTensor("lambda_layer", parameters.required("lambda_layer")),
         SavedTensor("alpha", Tensor(scalar: alpha), storage: .float32)]
    }
}
