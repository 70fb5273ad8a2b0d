import LycorisCore

/// LoHa (LyCORIS `LohaModule`, FedPara): ΔW = s·σ·(w1a·w1b) ⊙ (w2a·w2b).
///
/// Shapes (r = rank, K = Π kernel):
/// - Linear, or conv without Tucker: `hada_w{1,2}_a` (out, r), `hada_w{1,2}_b` (r, in·K).
/// - Conv with Tucker (k ≠ 1): `hada_w{1,2}_a` (r, out), `hada_w{1,2}_b` (r, in),
///   `hada_t{1,2}` (r, r, k…); each half is the Tucker rebuild of (t, a, b).
/// Init: w1b, w2b ~ N(0, 1); w1a ~ N(0, 0.1); w2a = 0 (N(0, 0.1) with use_scalar); t ~ N(0, 0.1).
///
/// Backward (FedPara Prop. 3): with G' = s·σ·∂ΔW, ∂half₁ = G' ⊙ half₂ and
/// ∂half₂ = G' ⊙ half₁, then each half's factor gradients. Only the factors are kept;
/// the two products are recomputed in the backward pass, never stored between passes.
public struct LoHa: AdapterAlgorithm {
    public static let algorithm = Algorithm.loha
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let scale: Float
    public let savedAlpha: Float
    public let usesTucker: Bool
    public var rank: Int? { parameters.required("hada_w1_b").shape[0] }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        self.layer = layer
        let r = options.rank
        usesTucker = options.useTucker && layer.kernelSize.contains { $0 != 1 }
        let rule = ScaleRule(alpha: options.alpha, rank: r, rsLoRA: options.rsLoRA)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        let shapes = Self.factorShapes(layer: layer, rank: r, tucker: usesTucker)
        var p = ParameterSet()
        // LyCORIS's initialisation order: t1, t2, w1_b, w1_a, w2_b, w2_a.
        if usesTucker {
            p["hada_t1"] = .normal(shapes.core, std: 0.1, using: &random)
            p["hada_t2"] = .normal(shapes.core, std: 0.1, using: &random)
        }
        p["hada_w1_b"] = .normal(shapes.b, std: 1, using: &random)
        p["hada_w1_a"] = .normal(shapes.a, std: 0.1, using: &random)
        p["hada_w2_b"] = .normal(shapes.b, std: 1, using: &random)
        p["hada_w2_a"] = options.useScalar ? .normal(shapes.a, std: 0.1, using: &random) : .zeros(shapes.a)
        if options.useScalar { p["scalar"] = Tensor(scalar: 0) }
        parameters = p
    }

    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        self.layer = layer
        let names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        guard names.allSatisfy({ tensors[$0] != nil }) else {
            throw AdapterError("loha: hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b are all required")
        }
        usesTucker = tensors["hada_t1"] != nil
        if usesTucker != (tensors["hada_t2"] != nil) { throw AdapterError("loha: hada_t1 and hada_t2 must come together") }
        let r = tensors["hada_w1_b"]!.shape.first ?? 0
        let shapes = Self.factorShapes(layer: layer, rank: r, tucker: usesTucker)
        var p = ParameterSet()
        for name in names {
            try Self.expectShape(tensors[name]!, name.hasSuffix("_a") ? shapes.a : shapes.b, name)
            p[name] = tensors[name]!
        }
        if usesTucker {
            for name in ["hada_t1", "hada_t2"] {
                try Self.expectShape(tensors[name]!, shapes.core, name)
                p[name] = tensors[name]!
            }
        }
        let rule = ScaleRule(fileAlpha: alpha, rank: r)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        parameters = p
    }

    private static func factorShapes(layer: LayerSpec, rank r: Int, tucker: Bool) -> (a: [Int], b: [Int], core: [Int]) {
        if tucker { return ([r, layer.outFeatures], [r, layer.weightInFeatures], [r, r] + layer.kernelSize) }
        return ([layer.outFeatures, r], [r, layer.weightInFeatures * layer.kernelElements], [])
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), gradient: gradient, multiplier: 1))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// Half i of the Hadamard product, (out, in·K) or weight-shaped with Tucker.
    private func half<A: WeightAlgebra>(_ i: Int, _ algebra: A, _ p: Factors<A.Value>) -> A.Value {
        let a = p.required("hada_w\(i)_a"), b = p.required("hada_w\(i)_b")
        if let core = p["hada_t\(i)"] { return TuckerProduct.rebuild(algebra, core: core, a: a, b: b) }
        return algebra.matmul(a, b)
    }

    /// Factor gradients of half i given ∂half.
    private func halfBackward<A: WeightAlgebra>(_ i: Int, _ algebra: A, _ p: Factors<A.Value>, _ gradient: A.Value,
                                                into grads: inout [(String, A.Value)]) {
        let a = p.required("hada_w\(i)_a"), b = p.required("hada_w\(i)_b")
        if let core = p["hada_t\(i)"] {
            let g = TuckerProduct.backward(algebra, gradient, core: core, a: a, b: b)
            grads += [("hada_w\(i)_a", g.a), ("hada_w\(i)_b", g.b), ("hada_t\(i)", g.core)]
        } else {
            grads += [("hada_w\(i)_a", algebra.matmul(gradient, b, transposeB: true)),
                      ("hada_w\(i)_b", algebra.matmul(a, transposeA: true, gradient))]
        }
    }

    /// m·ΔW = m·s·σ·half₁ ⊙ half₂ (weight shape).
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, multiplier m: Float) -> A.Value {
        algebra.reshaped(algebra.hadamard(half(1, algebra, p), half(2, algebra, p), scale: m * scale * p.scalar(algebra)),
                         layer.weightShape)
    }

    /// ∂parameters from G = ∂(m·ΔW): with f = m·s·σ, ∂half₁ = f·G ⊙ half₂, ∂half₂ = f·G ⊙ half₁,
    /// then each half's factors; ∂σ = m·s·⟨G, half₁ ⊙ half₂⟩.
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, gradient: A.Value,
                                                       multiplier m: Float) -> [(String, A.Value)] {
        let (h1, h2) = (half(1, algebra, p), half(2, algebra, p))
        let g = algebra.reshaped(gradient, algebra.shape(of: h1))
        let factor = m * scale * p.scalar(algebra)
        var grads: [(String, A.Value)] = []
        halfBackward(1, algebra, p, algebra.hadamard(g, h2, scale: factor), into: &grads)
        halfBackward(2, algebra, p, algebra.hadamard(g, h1, scale: factor), into: &grads)
        if p["scalar"] != nil { grads.append(("scalar", algebra.dot(g, algebra.hadamard(h1, h2, scale: 1), scale: m * scale))) }
        return grads
    }

    public func savedTensors() -> [SavedTensor] {
        var saved = [SavedTensor("alpha", Tensor(scalar: savedAlpha), storage: .float32),
                     SavedTensor("hada_w1_a", parameters.required("hada_w1_a") * parameters.scalar)]
        for name in ["hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"] {
            if let tensor = parameters[name] { saved.append(SavedTensor(name, tensor)) }
        }
        return saved
    }
}
