import LycorisCore

/// Full fine-tuning as an adapter (LyCORIS `FullModule`): the change itself is trained.
///
/// `diff` has the base weight's shape, `diff_b` the bias's (out,) where the layer has a
/// bias (or the file has one); both start at 0. ΔW = diff, Δb = diff_b, so
/// W' = W0 + m·diff and b' = b + m·diff_b; rank dropout masks the rows of both.
/// Only the difference is held: the base weight stays where it is (LyCORIS moves the
/// layer's weight into the module and keeps a copy of the original — two copies).
/// No bypass mode (LyCORIS raises for an explicit `bypass_mode`, and so does this).
/// Files: `diff`, `diff_b`.
public struct Full: AdapterAlgorithm {
    public static let algorithm = Algorithm.full
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public var scale: Float { 1 }
    public var rank: Int? { nil }
    public var adaptsBias: Bool { parameters["diff_b"] != nil }

    /// A zero difference; `hasBias`: whether the layer has a bias to adapt.
    public init(layer: LayerSpec, options: AdapterOptions, hasBias: Bool) throws {
        if options.bypassMode == true { throw AdapterError("full has no bypass mode (bypass_mode true)") }
        self.layer = layer
        parameters = ParameterSet([("diff", .zeros(layer.weightShape))] + (hasBias ? [("diff_b", .zeros(layer.biasShape))] : []))
    }

    /// A module on a layer without a bias (``Algorithm/makeAdapter(layer:options:random:baseWeight:hasBias:)``
    /// passes the layer's bias).
    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        try self.init(layer: layer, options: options, hasBias: false)
    }

    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        guard let diff = tensors["diff"] else { throw AdapterError("full: diff is required") }
        try Self.expectShape(diff, layer.weightShape, "diff")
        if let bias = tensors["diff_b"] { try Self.expectShape(bias, layer.biasShape, "diff_b") }
        self.layer = layer
        parameters = ParameterSet([("diff", diff)] + (tensors["diff_b"].map { [("diff_b", $0)] } ?? []))
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor { parameters.required("diff") }

    public func deltaBias(_ context: DeltaContext) throws -> Tensor { parameters["diff_b"] ?? .zeros(layer.biasShape) }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        try deltaWeightBackward(gradient, biasGradient: nil, context)
    }

    public func deltaWeightBackward(_ gradient: Tensor, biasGradient: Tensor?, _ context: DeltaContext) throws -> ParameterSet {
        var grads = ParameterSet([("diff", gradient)])
        if adaptsBias { grads["diff_b"] = biasGradient ?? .zeros(layer.biasShape) }
        return grads
    }

    public func savedTensors() -> [SavedTensor] {
        parameters.entries.map { SavedTensor($0.name, $0.tensor) }
    }
}
