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

    private func matrix(_ name: String) -> Tensor { parameters.required(name).flattenedToMatrix() }

    /// A weight-shaped tensor as the (out·K, in) matrix with its input axis last, and back.
    private func inputAxisLast(_ w: Tensor) -> Tensor {
        guard w.rank > 2 else { return w }
        return w.permuted([0] + Array(2..<w.rank) + [1]).reshaped([-1, layer.weightInFeatures])
    }

    private func weightLayout(_ m: Tensor) -> Tensor {
        guard layer.isConvolution else { return m }
        let shape = layer.weightShape
        let rank = shape.count
        return m.reshaped([shape[0]] + Array(shape[2...]) + [shape[1]]).permuted([0, rank - 1] + Array(1..<(rank - 1)))
    }

    private func baseWeight(_ context: DeltaContext) throws -> Tensor {
        guard let w0 = context.baseWeight else { throw AdapterError("glora needs the base layer's weight") }
        return w0
    }

    /// W0·A + B without scale and scalar, weight shape.
    private func product(_ w0: Tensor) -> Tensor {
        let wa = Tensor.matmul(Tensor.matmul(inputAxisLast(w0), matrix("a1.weight")), matrix("a2.weight"))
        return weightLayout(wa) + Tensor.matmul(matrix("b1.weight"), matrix("b2.weight")).reshaped(layer.weightShape)
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        product(try baseWeight(context)) * (scale * parameters.scalar)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        let w0 = try baseWeight(context)
        let scaled = gradient * (scale * parameters.scalar)
        let (w0t, gt) = (inputAxisLast(w0), inputAxisLast(scaled))
        let (a1, a2, b1, b2) = (matrix("a1.weight"), matrix("a2.weight"), matrix("b1.weight"), matrix("b2.weight"))
        let gm = scaled.flattenedToMatrix()
        var grads = ParameterSet()
        grads["a1.weight"] = Tensor.matmul(Tensor.matmul(w0t, transposeA: true, gt), a2, transposeB: true)
            .reshaped(parameters.required("a1.weight").shape)
        grads["a2.weight"] = Tensor.matmul(Tensor.matmul(w0t, a1), transposeA: true, gt).reshaped(parameters.required("a2.weight").shape)
        grads["b1.weight"] = Tensor.matmul(gm, b2, transposeB: true).reshaped(parameters.required("b1.weight").shape)
        grads["b2.weight"] = Tensor.matmul(b1, transposeA: true, gm).reshaped(parameters.required("b2.weight").shape)
        if parameters["scalar"] != nil { grads["scalar"] = Tensor(scalar: scale * gradient.dot(product(w0))) }
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
