import LycorisCore

/// (IA)³ (LyCORIS `IA3Module`): a learned per-channel scale of the base weight.
///
/// `weight`: (C,) for linear, (1, C, 1…) for conv, C = out channels, or in channels with
/// train_on_input; init 0. ΔW = W0 ⊙ w broadcast along the output axis (rows) or, with
/// train_on_input, the input axis (columns); W' = W0 ⊙ (1 + m·w).
/// Bypass: Δ(x) = op(x ⊙ w, W0) on input, or w ⊙ (op(x, W0) + b) on output — the bias is
/// scaled in bypass mode only, as in LyCORIS.
/// Files: `weight` and `on_input` (I64 0/1). LyCORIS 4.1.3 cannot reload its own IA3 files;
/// this loader can.
public struct IA3: AdapterAlgorithm {
    public static let algorithm = Algorithm.ia3
    public let layer: LayerSpec
    public var parameters: ParameterSet
    public let onInput: Bool
    public var scale: Float { 1 }
    public var rank: Int? { nil }

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        try self.init(layer: layer, onInput: options.trainOnInput, weight: nil)
    }

    public init(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?) throws {
        guard let weight = tensors["weight"] else { throw AdapterError("ia3: weight is required") }
        let flag = tensors["on_input"]?.scalars.first ?? 0
        try self.init(layer: layer, onInput: flag != 0, weight: weight)
    }

    private init(layer: LayerSpec, onInput: Bool, weight: Tensor?) throws {
        self.layer = layer
        self.onInput = onInput
        if onInput, case let .convolution(geometry) = layer, geometry.groups != 1 {
            throw AdapterError("ia3: train_on_input is not defined for grouped convolutions (groups \(geometry.groups))")
        }
        let channels = onInput ? layer.inputChannels : layer.outFeatures
        let shape = layer.isConvolution ? [1, channels] + layer.kernelSize.map { _ in 1 } : [channels]
        if let weight { try Self.expectShape(weight, shape, "weight") }
        parameters = ParameterSet([("weight", weight ?? .zeros(shape))])
    }

    private var channelScale: Tensor { parameters.required("weight") }
    /// The weight axis the scale runs along: 1 (columns) on input, 0 (rows) on output.
    private var axis: Int { onInput ? 1 : 0 }

    private func base(_ context: DeltaContext) throws -> Tensor {
        guard let base = context.baseWeight else { throw AdapterError("ia3 needs the base layer's weight") }
        return base
    }

    /// `tensor` with each slice along weight axis `axis` multiplied by w[c].
    private func scaleAlongAxis(_ tensor: Tensor) -> Tensor {
        let shape = tensor.shape
        let inner = shape[(axis + 1)...].reduce(1, *)
        let channels = shape[axis]
        let w = channelScale.scalars
        return Tensor(shape: shape, scalars: tensor.scalars.enumerated().map { $0.element * w[($0.offset / inner) % channels] })
    }

    /// Σ over every axis but `axis` of `tensor`, shaped like the parameter.
    private func reduceAlongAxis(_ tensor: Tensor) -> Tensor {
        let shape = tensor.shape
        let inner = shape[(axis + 1)...].reduce(1, *)
        let channels = shape[axis]
        var sums = [Double](repeating: 0, count: channels)
        for (i, v) in tensor.scalars.enumerated() { sums[(i / inner) % channels] += Double(v) }
        return Tensor(shape: channelScale.shape, scalars: sums.map(Float.init))
    }

    public func deltaWeight(_ context: DeltaContext) throws -> Tensor {
        scaleAlongAxis(try base(context))
    }

    public func deltaWeightBackward(_ gradient: Tensor, _ context: DeltaContext) throws -> ParameterSet {
        ParameterSet([("weight", reduceAlongAxis(gradient * (try base(context))))])
    }

    // MARK: Bypass: scale activations

    // No `bypassCost`: the bypass scales the bias too, so it is taken only when asked for.

    /// The activation's channel axis: last for linear, 1 for conv.
    private func activationChannels(_ x: Tensor, _ scales: Tensor) -> Tensor {
        OperatorChain.scaleChannels(x, by: scales, op: layer)
    }

    /// Σ a ⊙ (b − d) over every axis but the channel axis (d per channel, nil: 0), shaped
    /// like the parameter.
    private func activationReduce(_ a: Tensor, times b: Tensor, minus d: [Float]? = nil) -> Tensor {
        let layout = layer.channelLayout(of: a.shape, channels: channelScale.count)
        return Tensor(shape: channelScale.shape, scalars: a.channelSums(layout, times: b, minus: d))
    }

    private func baseOutput(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        var y = layer.apply(x, weight: try base(context))
        if let bias = context.baseBias { layer.addBias(&y, bias: bias) }
        return y
    }

    public func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        if onInput { return layer.apply(activationChannels(x, channelScale), weight: try base(context)) }
        return activationChannels(try baseOutput(x, context), channelScale)
    }

    public func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        let weight = try base(context)
        if onInput {
            let gradScaled = layer.backwardInput(gradOutput, weight: weight, inputShape: x.shape)
            return (activationChannels(gradScaled, channelScale), ParameterSet([("weight", activationReduce(gradScaled, times: x))]))
        }
        let y = try baseOutput(x, context)
        let gradInput = layer.backwardInput(activationChannels(gradOutput, channelScale), weight: weight, inputShape: x.shape)
        return (gradInput, ParameterSet([("weight", activationReduce(gradOutput, times: y))]))
    }

    // MARK: Elementwise transfer: the scaled tensor itself

    /// The adapted tensor of the elementwise transfer, one pass over `t` with scales 1 + m·w
    /// along its channel axis (last for linear, 1 for conv):
    /// - on output, t = y = op(x, W0) + b (N, …, out): y' = y ⊙ (1 + m·w) − m·w ⊙ b, i.e.
    ///   op(x, W0 ⊙ (1 + m·w)) + b, with `bias` the part the forward leaves unscaled (the
    ///   layer's bias in rebuild mode; nil in bypass mode, which scales it too);
    /// - on input, t = x (N, …, in): x' = x ⊙ (1 + m·w), so that op(x', W0) + b is the
    ///   adapted output (the client applies the base layer).
    public func elementwise(_ t: Tensor, multiplier m: Float, bias: Tensor?) -> Tensor {
        let w = channelScale.scalars
        let shifts = onInput ? nil : bias.map { zip(w, $0.scalars).map { -m * $0 * $1 } }
        return t.channelAffine(layer.channelLayout(of: t.shape, channels: w.count), scales: elementwiseScales(m), shifts: shifts)
    }

    /// (∂t, ∂w) of ``elementwise(_:multiplier:bias:)`` given ∂t':
    /// ∂t = ∂t' ⊙ (1 + m·w), ∂w = m·Σ ∂t' ⊙ (t − b) over every axis but the channel axis.
    public func elementwiseBackward(_ t: Tensor, gradOutput: Tensor, multiplier m: Float, bias: Tensor?) -> (input: Tensor, parameters: ParameterSet) {
        let layout = layer.channelLayout(of: t.shape, channels: channelScale.count)
        let gradInput = gradOutput.channelAffine(layout, scales: elementwiseScales(m))
        let sums = activationReduce(gradOutput, times: t, minus: onInput ? nil : bias?.scalars)
        return (gradInput, ParameterSet([("weight", sums * m)]))
    }

    private func elementwiseScales(_ m: Float) -> [Float] {
        channelScale.scalars.map { 1 + m * $0 }
    }

    public func savedTensors() -> [SavedTensor] {
        [SavedTensor("weight", channelScale), SavedTensor("on_input", Tensor(scalar: onInput ? 1 : 0), storage: .int64)]
    }
}
