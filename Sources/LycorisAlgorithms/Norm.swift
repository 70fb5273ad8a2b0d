import LycorisCore

/// Norm (LyCORIS `NormModule`, algo `norm`): a trained additive change of a normalisation
/// layer's affine weight and bias.
///
/// `w_norm`, `b_norm`: (K,), K = the element count of W0 (normalized_shape or (C,)); init 0.
/// ΔW = w_norm viewed as W0's shape, Δb = b_norm viewed likewise, so
/// Δ(x) = x̂ ⊙ ΔW + Δb = op(x, ΔW, Δb) and y = x̂ ⊙ (W0 + m·ΔW) + b0 + m·Δb.
/// Δb applies only when the layer has a bias; `b_norm` exists (and is saved) regardless,
/// as in LyCORIS. No rank, α or scale: the factorisation options do not apply.
/// Files: `w_norm` and `b_norm` (a file without `b_norm` loads it as zeros).
public struct Norm: AdapterAlgorithm {
    public static let algorithm = Algorithm.norms
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public var scale: Float { 1 }
    public var rank: Int? { nil }
    public var adaptsBias: Bool { layer.normalization?.hasBias ?? false }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        try self.init(layer: layer, weight: nil, bias: nil)
    }

    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        guard let weight = tensors["w_norm"] else { throw AdapterError("norms: w_norm is required") }
        try self.init(layer: layer, weight: weight, bias: tensors["b_norm"])
    }

    private init(layer: LayerSpec, weight: Tensor?, bias: Tensor?) throws {
        self.layer = layer
        let count = [layer.weightShape.product]
        if let weight { try Self.expectShape(weight, count, "w_norm") }
        if let bias { try Self.expectShape(bias, count, "b_norm") }
        parameters = ParameterSet([("w_norm", weight ?? .zeros(count)), ("b_norm", bias ?? .zeros(count))])
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        parameters.required("w_norm").reshaped(layer.weightShape)
    }

    public func deltaBias(_ context: DeltaContext) throws -> Tensor {
        parameters.required("b_norm").reshaped(layer.biasShape)
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        try deltaWeightBackward(gradient, biasGradient: nil, context)
    }

    /// ∂w_norm = ∂ΔW flattened; ∂b_norm = ∂Δb flattened (zero when the layer has no bias).
    public func deltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        let count = [layer.weightShape.product]
        let gradBias = adaptsBias ? biasGradient?.reshaped(count) : nil
        return ParameterSet([("w_norm", gradient.reshaped(count)), ("b_norm", gradBias ?? .zeros(count))])
    }

    public func savedTensors() -> [SavedTensor] {
        [SavedTensor("w_norm", parameters.required("w_norm")), SavedTensor("b_norm", parameters.required("b_norm"))]
    }
}
