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
///
/// Bypass (linear and ungrouped conv without Tucker): the Hadamard product of two rank-r
/// products has rank ≤ r², (w1a·w1b) ⊙ (w2a·w2b) = U·V with U (out, r²),
/// U[o, i·r+j] = w1a[o,i]·w2a[o,j], and V (r², in·K), V[i·r+j, p] = w1b[i,p]·w2b[j,p]; so
/// Δ(x) = s·σ·op(op(x, V), U), a LoCon chain of rank r² (cheaper than op(x, ΔW) when
/// r²·(in·K + out) < out·in·K).
public struct LoHa: MultiplierInFactors {
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

    // MARK: Bypass: a chain of rank r²

    private var bypassApplies: Bool {
        if usesTucker { return false }
        if case let .convolution(geometry) = layer { return geometry.groups == 1 }
        return true
    }

    /// r²·in·K (V) + out·r² (U) per output position.
    public var bypassCost: Int? {
        guard bypassApplies, let r = rank else { return nil }
        return r * r * (layer.weightInFeatures * layer.kernelElements + layer.outFeatures)
    }

    /// The chain x → op(x, V) → op(·, `factor`·U), V as (r², in, k…), U as (out, r², 1…).
    private func chain(factor: Float) -> (chain: OperatorChain, u: Tensor) {
        let r = rank ?? 0
        let a1 = parameters.required("hada_w1_a"), a2 = parameters.required("hada_w2_a")
        let (out, inner) = (layer.outFeatures, layer.weightInFeatures * layer.kernelElements)
        let u = Self.pairProducts(a1, a2, n: out, r: r, m: 1)
        let v = Self.pairProducts(parameters.required("hada_w1_b"), parameters.required("hada_w2_b"), n: 1, r: r, m: inner)
        let ones = layer.kernelSize.map { _ in 1 }
        let chain = OperatorChain.lowRank(layer, down: v.reshaped([r * r] + Array(layer.weightShape.dropFirst())),
                                          up: (u * factor).reshaped([out, r * r] + ones), rankMask: nil)
        return (chain, u)
    }

    /// What the chain's stage input op(x, V) depends on besides x: the b factors.
    private var stageKey: [Tensor] { [parameters.required("hada_w1_b"), parameters.required("hada_w2_b")] }

    /// m·Δ(x) through the rank-r² chain with up' = m·s·σ·U (op(x, m·ΔW) without a bypass).
    public func multipliedBypassForward(_ x: Tensor, multiplier m: Float, _ context: DeltaContext) throws -> Tensor {
        guard bypassApplies else { return try weightPathForward(x, multiplier: m, context) }
        return chain(factor: m * scale * parameters.scalar).chain.forward(x, caching: context.stageCache, key: stageKey)
    }

    /// Through the chain: ∂U = m·s·σ·∂U', ∂V, then the pair products' backward to the four
    /// factors; ∂σ = m·s·⟨∂U', U⟩.
    public func multipliedBypassBackward(_ x: Tensor, gradOutput: Tensor, multiplier m: Float,
                                         _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        guard bypassApplies else { return try weightPathBackward(x, gradOutput: gradOutput, multiplier: m, context) }
        let r = rank ?? 0
        let factor = m * scale * parameters.scalar
        let (chain, u) = chain(factor: factor)
        let back = chain.backward(chain.tape(x, cache: context.stageCache, key: stageKey), gradOutput: gradOutput)
        let gradScaledU = back.weights[1].reshaped(u.shape)
        let a = Self.pairProductsBackward(gradScaledU * factor, parameters.required("hada_w1_a"), parameters.required("hada_w2_a"),
                                          n: layer.outFeatures, r: r, m: 1)
        let b = Self.pairProductsBackward(back.weights[0], parameters.required("hada_w1_b"), parameters.required("hada_w2_b"),
                                          n: 1, r: r, m: layer.weightInFeatures * layer.kernelElements)
        var grads = ParameterSet([("hada_w1_a", a.first), ("hada_w1_b", b.first), ("hada_w2_a", a.second), ("hada_w2_b", b.second)])
        if parameters["scalar"] != nil { grads["scalar"] = Tensor(scalar: m * scale * gradScaledU.dot(u)) }
        return (back.input, grads)
    }

    /// P (n, r², m) with P[x, i·r + j, y] = A[x, i, y]·B[x, j, y], for A and B (n, r, m) —
    /// U with (n, m) = (out, 1), V with (1, in·K).
    private static func pairProducts(_ a: Tensor, _ b: Tensor, n: Int, r: Int, m: Int) -> Tensor {
        var p = Tensor.zeros([n, r * r * m])
        for x in 0..<n {
            for i in 0..<r {
                for j in 0..<r {
                    let (pa, pb, pp) = ((x * r + i) * m, (x * r + j) * m, ((x * r + i) * r + j) * m)
                    for y in 0..<m { p.scalars[pp + y] = a.scalars[pa + y] * b.scalars[pb + y] }
                }
            }
        }
        return p.reshaped([n == 1 ? r * r : n, n == 1 ? m : r * r])
    }

    /// (∂A, ∂B) of ``pairProducts(_:_:n:r:m:)`` given ∂P:
    /// ∂A[x, i, y] = Σ_j ∂P[x, i·r+j, y]·B[x, j, y], ∂B[x, j, y] = Σ_i ∂P[x, i·r+j, y]·A[x, i, y].
    private static func pairProductsBackward(_ g: Tensor, _ a: Tensor, _ b: Tensor, n: Int, r: Int, m: Int) -> (first: Tensor, second: Tensor) {
        var (ga, gb) = (Tensor.zeros(a.shape), Tensor.zeros(b.shape))
        for x in 0..<n {
            for i in 0..<r {
                for j in 0..<r {
                    let (pa, pb, pp) = ((x * r + i) * m, (x * r + j) * m, ((x * r + i) * r + j) * m)
                    for y in 0..<m {
                        ga.scalars[pa + y] += g.scalars[pp + y] * b.scalars[pb + y]
                        gb.scalars[pb + y] += g.scalars[pp + y] * a.scalars[pa + y]
                    }
                }
            }
        }
        return (ga, gb)
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
