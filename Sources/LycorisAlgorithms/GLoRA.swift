import LycorisCore

/// GLoRA (LyCORIS `GLoRAModule`): ΔW = s·σ·(W0·A + B) with A = a1·a2 acting on the input
/// axis of the frozen base weight and B = b1·b2 a LoRA.
///
/// Shapes (r = rank, K = Π kernel; a conv's 1×1 factors carry trailing 1s):
/// - `a1.weight` (in, r[, 1…]), `a2.weight` (r, in[, 1…]): A (in, in);
/// - `b1.weight` (out, r[, 1…]), `b2.weight` (r, in[, k…]): B = b1·b2 reshaped to W0's shape.
/// - (W0·A)[o, j, k…] = Σ_i W0[o, i, k…]·A[i, j]: computed as W0ᵗ·a1·a2 with W0ᵗ the
///   (out·K, in) matrix of W0 with its input axis last — A is never built.
/// s = α/r (α/√r with rs_lora), σ the optional trainable scalar. W0 is a read-only
/// reference from ``DeltaContext/baseWeight``, never copied into the module.
/// Init: a1, b1 kaiming-uniform(a=√5); a2, b2 zeros (kaiming with use_scalar, σ = 0).
/// Backward, with G' = s·σ·∂ΔW (G'ᵗ with its input axis last):
///     ∂a1 = W0ᵗᵀ·G'ᵗ·a2ᵀ    ∂a2 = (W0ᵗ·a1)ᵀ·G'ᵗ    ∂b1 = G'·b2ᵀ    ∂b2 = b1ᵀ·G'
/// Bypass: op(x, ΔW) (LyCORIS's W0(a1(a2(x))) + b1(b2(x)) is the same function and costs more).
/// Files: `a1.weight`, `a2.weight` (σ folded), `b1.weight`, `b2.weight` (σ folded), `alpha`.
/// LyCORIS 4.1.3 never builds its Tucker variant (`bm.weight`: its condition asks for a
/// kernel that is all 1s and not all 1s), so `use_tucker` is ignored and `bm.weight` refused.
/// Grouped convolutions are refused (LyCORIS sizes A by all input channels and fails there).
public struct GLoRA: AdapterAlgorithm {
    public static let algorithm = Algorithm.glora
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let scale: Float
    public let savedAlpha: Float
    public var rank: Int? { parameters.required("a2.weight").shape[0] }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        try Self.checkLayer(layer)
        self.layer = layer
        let r = options.rank
        let rule = ScaleRule(alpha: options.alpha, rank: r, rsLoRA: options.rsLoRA)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        let shapes = Self.factorShapes(layer: layer, rank: r)
        var p = ParameterSet()
        p["a1.weight"] = .kaimingUniform(shapes.a1, using: &random)
        p["a2.weight"] = options.useScalar ? .kaimingUniform(shapes.a2, using: &random) : .zeros(shapes.a2)
        p["b1.weight"] = .kaimingUniform(shapes.b1, using: &random)
        p["b2.weight"] = options.useScalar ? .kaimingUniform(shapes.b2, using: &random) : .zeros(shapes.b2)
        if options.useScalar { p["scalar"] = Tensor(scalar: 0) }
        parameters = p
    }

    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        try Self.checkLayer(layer)
        self.layer = layer
        if tensors["bm.weight"] != nil {
            throw AdapterError("glora: bm.weight (a Tucker core) is not supported; LyCORIS 4.1.3 never writes one")
        }
        let names = ["a1.weight", "a2.weight", "b1.weight", "b2.weight"]
        guard names.allSatisfy({ tensors[$0] != nil }) else {
            throw AdapterError("glora: a1.weight, a2.weight, b1.weight and b2.weight are all required")
        }
        let r = tensors["a2.weight"]!.shape.first ?? 0
        let shapes = Self.factorShapes(layer: layer, rank: r)
        var p = ParameterSet()
        for (name, shape) in zip(names, [shapes.a1, shapes.a2, shapes.b1, shapes.b2]) {
            try Self.expectShape(tensors[name]!, shape, name)
            p[name] = tensors[name]!
        }
        let rule = ScaleRule(fileAlpha: alpha, rank: r)
        scale = rule.scale
        savedAlpha = rule.savedAlpha
        parameters = p
    }

    private static func checkLayer(_ layer: LayerSpec) throws {
        if case let .convolution(geometry) = layer, geometry.groups != 1 {
            throw AdapterError("glora does not adapt grouped convolutions (groups \(geometry.groups))")
        }
    }

    private static func factorShapes(layer: LayerSpec, rank r: Int) -> (a1: [Int], a2: [Int], b1: [Int], b2: [Int]) {
        let (inner, out) = (layer.weightInFeatures, layer.outFeatures)
        let ones = layer.kernelSize.map { _ in 1 }
        return ([inner, r] + ones, [r, inner] + ones, [out, r] + ones, [r, inner] + layer.kernelSize)
    }

    private func baseWeight(_ context: DeltaContext) throws -> Tensor {
        guard let w0 = context.baseWeight else { throw AdapterError("glora needs the base layer's weight") }
        return w0
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        deltaWeight(TensorAlgebra(), Factors(parameters), baseWeight: try baseWeight(context), multiplier: 1)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet(deltaWeightBackward(TensorAlgebra(), Factors(parameters), baseWeight: try baseWeight(context),
                                         gradient: gradient, multiplier: 1))
    }

    // MARK: Weight path, generic over the algebra (host and device)

    /// A weight-shaped tensor as the (out·K, in) matrix with its input axis last.
    private func inputAxisLast<A: WeightAlgebra>(_ algebra: A, _ w: A.Value) -> A.Value {
        guard layer.isConvolution else { return w }
        let (out, inner, k) = (layer.outFeatures, layer.weightInFeatures, layer.kernelElements)
        return algebra.reshaped(algebra.swappingMiddleAxes(w, [out, inner, k, 1]), [out * k, inner])
    }

    /// The (out·K, in) matrix back in the weight's layout.
    private func weightLayout<A: WeightAlgebra>(_ algebra: A, _ m: A.Value) -> A.Value {
        guard layer.isConvolution else { return m }
        let (out, inner, k) = (layer.outFeatures, layer.weightInFeatures, layer.kernelElements)
        return algebra.reshaped(algebra.swappingMiddleAxes(m, [out, k, inner, 1]), layer.weightShape)
    }

    /// α·(W0·A + B), weight shape.
    private func product<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, _ w0: A.Value, alpha: Float) -> A.Value {
        let (a1, a2) = (algebra.matrix(p.required("a1.weight")), algebra.matrix(p.required("a2.weight")))
        let (b1, b2) = (algebra.matrix(p.required("b1.weight")), algebra.matrix(p.required("b2.weight")))
        let wa = algebra.matmul(algebra.matmul(inputAxisLast(algebra, w0), a1), transposeA: false, a2, transposeB: false, alpha: alpha)
        let b = algebra.matmul(b1, transposeA: false, b2, transposeB: false, alpha: alpha)
        return algebra.adding(weightLayout(algebra, wa), algebra.reshaped(b, layer.weightShape))
    }

    /// m·ΔW = m·s·σ·(W0·A + B) (weight shape); W0 is read, never changed.
    package func deltaWeight<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, baseWeight w0: A.Value,
                                               multiplier m: Float) -> A.Value {
        product(algebra, p, w0, alpha: m * scale * p.scalar(algebra))
    }

    /// ∂parameters from G = ∂(m·ΔW), with f = m·s·σ (G'ᵗ = f·G with its input axis last):
    /// ∂a1 = W0ᵗᵀ·G'ᵗ·a2ᵀ, ∂a2 = (W0ᵗ·a1)ᵀ·G'ᵗ, ∂b1 = G'·b2ᵀ, ∂b2 = b1ᵀ·G', ∂σ = m·s·⟨G, W0·A + B⟩.
    package func deltaWeightBackward<A: WeightAlgebra>(_ algebra: A, _ p: Factors<A.Value>, baseWeight w0: A.Value,
                                                       gradient: A.Value, multiplier m: Float) -> [(String, A.Value)] {
        let factor = m * scale * p.scalar(algebra)
        let (w0t, gt) = (inputAxisLast(algebra, w0), inputAxisLast(algebra, gradient))
        let (a1, a2) = (algebra.matrix(p.required("a1.weight")), algebra.matrix(p.required("a2.weight")))
        let (b1, b2) = (algebra.matrix(p.required("b1.weight")), algebra.matrix(p.required("b2.weight")))
        let gm = algebra.matrix(gradient)
        func shaped(_ value: A.Value, _ name: String) -> (String, A.Value) {
            (name, algebra.reshaped(value, algebra.shape(of: p.required(name))))
        }
        var grads = [
            shaped(algebra.matmul(algebra.matmul(w0t, transposeA: true, gt), transposeA: false, a2, transposeB: true, alpha: factor),
                   "a1.weight"),
            shaped(algebra.matmul(algebra.matmul(w0t, a1), transposeA: true, gt, transposeB: false, alpha: factor), "a2.weight"),
            shaped(algebra.matmul(gm, transposeA: false, b2, transposeB: true, alpha: factor), "b1.weight"),
            shaped(algebra.matmul(b1, transposeA: true, gm, transposeB: false, alpha: factor), "b2.weight"),
        ]
        if p["scalar"] != nil { grads.append(("scalar", algebra.dot(gradient, product(algebra, p, w0, alpha: 1), scale: m * scale))) }
        return grads
    }

    public func savedTensors() -> [SavedTensor] {
        let sigma = parameters.scalar
        return [SavedTensor("alpha", Tensor(scalar: savedAlpha), storage: .float32),
                SavedTensor("a1.weight", parameters.required("a1.weight")),
                SavedTensor("a2.weight", parameters.required("a2.weight") * sigma),
                SavedTensor("b1.weight", parameters.required("b1.weight")),
                SavedTensor("b2.weight", parameters.required("b2.weight") * sigma)]
    }
}
