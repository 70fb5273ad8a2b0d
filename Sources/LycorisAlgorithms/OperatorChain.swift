import LycorisCore

/// A sequence of bias-free layer ops `x → op₁(x, W₁) → … → opₙ(·, Wₙ)`, with an optional
/// per-channel mask on the input of the last op (LoCon's rank dropout in bypass mode).
/// Used by bypass paths that apply low-rank factors one after another. A stage that is a
/// factor convolution — stride 1, one group, a kernel, at most ``directOutputLimit`` outputs
/// (LoCon's down and Tucker core, the LoHa and DyLoRA down stages) — runs on
/// ``DirectConvolution`` (no im2col); the other stages on the layer op.
struct OperatorChain {
    var stages: [(op: LayerSpec, weight: Tensor)]
    var maskBeforeLast: Tensor?

    /// down → up on a linear layer or an ungrouped convolution: `down` (r, in, k…) with the
    /// layer's geometry and r outputs, then `up` (out, r, 1…) pointwise; `rankMask` (r,) on
    /// the rank axis between them.
    static func lowRank(_ layer: LayerSpec, down: Tensor, up: Tensor, rankMask: Tensor?) -> OperatorChain {
        let r = down.shape[0]
        switch layer {
        case let .linear(inFeatures, outFeatures):
            return OperatorChain(stages: [(.linear(inFeatures: inFeatures, outFeatures: r), down),
                                          (.linear(inFeatures: r, outFeatures: outFeatures), up)], maskBeforeLast: rankMask)
        case let .convolution(geometry):
            let upOp = ConvGeometry.pointwise(inChannels: r, outChannels: geometry.outChannels, spatialRank: geometry.spatialRank)
            return OperatorChain(stages: [(.convolution(geometry.with(outChannels: r)), down), (.convolution(upOp), up)],
                                 maskBeforeLast: rankMask)
        case .norm: preconditionFailure("a low-rank chain needs a linear or convolution layer")
        }
    }

    /// What the backward pass needs of a forward: the input of every stage, and for a stage
    /// on ``DirectConvolution`` that input zero-padded as its forward read it (nil for the
    /// others), so that its ∂W does not pad it again.
    struct Tape {
        var inputs: [Tensor]
        var padded: [DirectConvolution.PaddedInput?]
    }

    /// The output and the input of every stage (kept for the backward pass).
    func forward(_ x: Tensor) -> (output: Tensor, stageInputs: [Tensor]) {
        let (output, tape) = taped(x)
        return (output, tape.inputs)
    }

    /// ``forward(_:)``, its tape kept in `cache` under `key` (x and the factors).
    func forward(_ x: Tensor, caching cache: StageCache, key: [Tensor]) -> Tensor {
        let (output, tape) = taped(x)
        cache.store(tape.inputs, padded: tape.padded, for: [x] + key)
        return output
    }

    /// The tape the forward kept for x and `key`, or computed again.
    func tape(_ x: Tensor, cache: StageCache, key: [Tensor]) -> Tape {
        if let (inputs, padded) = cache.tape(for: [x] + key) { return Tape(inputs: inputs, padded: padded) }
        return tape(x)
    }

    /// The tape of x, the last op not applied: what the backward pass needs.
    func tape(_ x: Tensor) -> Tape {
        var tape = Tape(inputs: [], padded: [])
        var h = x
        for (index, stage) in stages.enumerated() {
            if index == stages.count - 1, let mask = maskBeforeLast {
                h = Self.scaleChannels(h, by: mask, op: stage.op)
            }
            let padded = Self.directGeometry(stage.op).map { DirectConvolution.PaddedInput(h, geometry: $0) }
            tape.inputs.append(h)
            tape.padded.append(padded)
            if index < stages.count - 1 { h = Self.apply(stage.op, h, padded: padded, weight: stage.weight) }
        }
        return tape
    }

    /// The output and the tape of x.
    private func taped(_ x: Tensor) -> (output: Tensor, tape: Tape) {
        let tape = tape(x)
        let last = stages.count - 1
        return (Self.apply(stages[last].op, tape.inputs[last], padded: tape.padded[last], weight: stages[last].weight), tape)
    }

    /// (∂x, ∂Wᵢ for every stage) given ∂output, from the stage inputs alone.
    func backward(stageInputs: [Tensor], gradOutput: Tensor) -> (input: Tensor, weights: [Tensor]) {
        backward(Tape(inputs: stageInputs, padded: Array(repeating: nil, count: stageInputs.count)), gradOutput: gradOutput)
    }

    /// (∂x, ∂Wᵢ for every stage) given ∂output.
    func backward(_ tape: Tape, gradOutput: Tensor) -> (input: Tensor, weights: [Tensor]) {
        var grad = gradOutput
        var weightGrads = [Tensor](repeating: Tensor.zeros([]), count: stages.count)
        for index in stages.indices.reversed() {
            let stage = stages[index]
            let input = tape.inputs[index]
            if let geometry = Self.directGeometry(stage.op) {
                let padded = tape.padded[index] ?? DirectConvolution.PaddedInput(input, geometry: geometry)
                weightGrads[index] = DirectConvolution.backwardWeight(padded, gradOutput: grad, geometry: geometry)
                grad = DirectConvolution.backwardInput(grad, weight: stage.weight, geometry: geometry, inputShape: input.shape)
            } else {
                weightGrads[index] = stage.op.backwardWeight(input, gradOutput: grad)
                grad = stage.op.backwardInput(grad, weight: stage.weight, inputShape: input.shape)
            }
            if index == stages.count - 1, let mask = maskBeforeLast {
                grad = Self.scaleChannels(grad, by: mask, op: stage.op)
            }
        }
        return (grad, weightGrads)
    }

    /// The most output channels a stage convolution has for ``DirectConvolution``: its
    /// correlation kernels keep a block of outputs in registers per input read, and with
    /// few outputs im2col's patch matrix (C·K per position) is what costs.
    static let directOutputLimit = 64

    /// The geometry of a stage that runs on ``DirectConvolution``, or nil.
    private static func directGeometry(_ op: LayerSpec) -> ConvGeometry? {
        guard case let .convolution(geometry) = op, DirectConvolution.supports(geometry),
              geometry.outChannels <= directOutputLimit else { return nil }
        return geometry
    }

    /// op(h, W) of one stage (`padded`: h padded, for a stage on ``DirectConvolution``).
    private static func apply(_ op: LayerSpec, _ h: Tensor, padded: DirectConvolution.PaddedInput?, weight: Tensor) -> Tensor {
        guard let geometry = directGeometry(op), let padded else { return op.apply(h, weight: weight) }
        return DirectConvolution.forward(padded, weight: weight, geometry: geometry)
    }

    /// Multiplies channel c of `h` (the input of `op`) by `mask[c]`.
    static func scaleChannels(_ h: Tensor, by mask: Tensor, op: LayerSpec) -> Tensor {
        h.channelAffine(op.channelLayout(of: h.shape, channels: mask.count), scales: mask.scalars)
    }
}
