import LycorisCore

/// The base layer an adapter is attached to, and its operation `op(x, W)` (no bias).
///
/// Linear: x (…, in) → y (…, out), `y = x · Wᵀ`, W (out, in).
/// Convolution, by the geometry's spatial rank:
/// - conv1d: x (N, C, L) → y (N, O, Lo), W (O, C/groups, k);
/// - conv2d: x (N, C, H, W) → y (N, O, Ho, Wo), W (O, C/groups, kh, kw);
/// - conv3d: x (N, C, D, H, W) → y (N, O, Do, Ho, Wo), W (O, C/groups, kd, kh, kw).
/// Norm: x → y of x's shape, `y = x̂ ⊙ W` (see ``Normalization``), W normalized_shape or (C,).
public enum LayerSpec: Sendable, Equatable, Hashable {
    case linear(inFeatures: Int, outFeatures: Int)
    case convolution(ConvGeometry)
    case norm(Normalization)

    /// The base weight's shape.
    public var weightShape: [Int] {
        switch self {
        case let .linear(inFeatures, outFeatures): [outFeatures, inFeatures]
        case let .convolution(geometry): geometry.weightShape
        case let .norm(normalization): normalization.weightShape
        }
    }

    /// The wire name of the layer kind: `linear`, `conv1d`, `conv2d`, `conv3d`, `layer_norm`
    /// or `group_norm`.
    public var kind: String {
        switch self {
        case .linear: "linear"
        case let .convolution(geometry): geometry.kind
        case let .norm(normalization): normalization.kindName
        }
    }

    /// Output channels: the extent the bias runs along (a norm's weight element count).
    public var outFeatures: Int { normalization?.channels ?? weightShape[0] }
    /// Input features per output as the weight sees them (in, or in/groups for conv; 1 for
    /// a norm, whose weight scales elementwise).
    public var weightInFeatures: Int { normalization == nil ? weightShape[1] : 1 }
    /// Input channels of the activation (in, or in_channels for conv).
    public var inputChannels: Int {
        switch self {
        case let .linear(inFeatures, _): inFeatures
        case let .convolution(geometry): geometry.inChannels
        case let .norm(normalization): normalization.channels
        }
    }
    /// Product of the kernel's spatial extents (1 for linear and norm).
    public var kernelElements: Int { kernelSize.product }
    public var kernelSize: [Int] { normalization == nil ? Array(weightShape[2...]) : [] }
    public var isConvolution: Bool { if case .convolution = self { true } else { false } }
    /// The normalisation of a norm layer (nil for the others).
    public var normalization: Normalization? { if case let .norm(normalization) = self { normalization } else { nil } }
    /// The bias's shape: (out,), or normalized_shape / (C,) for a norm.
    public var biasShape: [Int] { normalization?.weightShape ?? [outFeatures] }

    /// Why this layer description cannot be used, or nil.
    public var invalidReason: String? {
        switch self {
        case let .linear(inFeatures, outFeatures):
            inFeatures > 0 && outFeatures > 0 ? nil : "linear features must be positive (in \(inFeatures), out \(outFeatures))"
        case let .convolution(geometry): geometry.invalidReason
        case let .norm(normalization): normalization.invalidReason
        }
    }

    /// Why `shape` is not a valid input for this layer, or nil.
    public func inputProblem(_ shape: [Int]) -> String? {
        switch self {
        case let .linear(inFeatures, _):
            guard let last = shape.last, last == inFeatures else {
                return "linear input must end with \(inFeatures) features, got shape \(shape)"
            }
            return nil
        case let .convolution(geometry):
            let names = geometry.spatialRank == 1 ? ["L"] : Array(["D", "H", "W"].suffix(geometry.spatialRank))
            guard shape.count == 2 + geometry.spatialRank, shape[1] == geometry.inChannels else {
                return "\(geometry.kind) input must be (\((["N", "\(geometry.inChannels)"] + names).joined(separator: ", "))), got shape \(shape)"
            }
            let out = geometry.outputSize(Array(shape[2...]))
            return out.allSatisfy { $0 > 0 } ? nil : "\(geometry.kind) input \(shape) is smaller than the kernel"
        case let .norm(normalization):
            return normalization.inputProblem(shape)
        }
    }

    /// The output shape for an input of `shape`.
    public func outputShape(forInput shape: [Int]) -> [Int] {
        switch self {
        case let .linear(_, outFeatures): Array(shape.dropLast()) + [outFeatures]
        case let .convolution(geometry): [shape[0], geometry.outChannels] + geometry.outputSize(Array(shape[2...]))
        case .norm: shape
        }
    }

    /// `op(x, W)`.
    public func apply(_ x: Tensor, weight: Tensor) -> Tensor {
        switch self {
        case let .linear(inFeatures, outFeatures):
            let rows = x.reshaped([-1, inFeatures])
            return Tensor.matmul(rows, weight.reshaped([outFeatures, inFeatures]), transposeB: true)
                .reshaped(outputShape(forInput: x.shape))
        case let .convolution(geometry):
            return Convolution.forward(x, weight: weight, geometry: geometry)
        case let .norm(normalization):
            return normalization.forward(x, weight: weight)
        }
    }

    /// ∂x of `op(x, W)` given ∂y, for the layers that are linear in x (not norm: see
    /// ``backwardInput(_:weight:input:)``).
    public func backwardInput(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int]) -> Tensor {
        switch self {
        case let .linear(inFeatures, outFeatures):
            return Tensor.matmul(gradOutput.reshaped([-1, outFeatures]), weight.reshaped([outFeatures, inFeatures]))
                .reshaped(inputShape)
        case let .convolution(geometry):
            return Convolution.backwardInput(gradOutput, weight: weight, geometry: geometry, inputShape: inputShape)
        case .norm:
            preconditionFailure("a norm layer's ∂x depends on x: use backwardInput(_:weight:input:)")
        }
    }

    /// ∂x of `op(x, W)` given ∂y and x (which a norm layer's gradient depends on).
    public func backwardInput(_ gradOutput: Tensor, weight: Tensor, input x: Tensor) -> Tensor {
        if let normalization { return normalization.backwardInput(gradOutput, weight: weight, input: x) }
        return backwardInput(gradOutput, weight: weight, inputShape: x.shape)
    }

    /// ∂W of `op(x, W)` given x and ∂y.
    public func backwardWeight(_ x: Tensor, gradOutput: Tensor) -> Tensor {
        switch self {
        case let .linear(inFeatures, outFeatures):
            return Tensor.matmul(gradOutput.reshaped([-1, outFeatures]), transposeA: true, x.reshaped([-1, inFeatures]))
        case let .convolution(geometry):
            return Convolution.backwardWeight(x, gradOutput: gradOutput, geometry: geometry)
        case let .norm(normalization):
            return normalization.backwardWeight(x, gradOutput: gradOutput)
        }
    }

    /// Adds the bias (``biasShape``) along the output-channel axis.
    public func addBias(_ y: inout Tensor, bias: Tensor) {
        precondition(bias.count == outFeatures, "bias of \(bias.count) for \(outFeatures) outputs")
        y = y.channelAffine(channelLayout(of: y.shape), scales: nil, shifts: bias.scalars)
    }

    /// ∂b of `op(x, W) + b` given ∂y: ∂y summed over every axis but the channel axis.
    public func biasGradient(_ gradOutput: Tensor) -> Tensor {
        Tensor(shape: biasShape, scalars: gradOutput.channelSums(channelLayout(of: gradOutput.shape)))
    }

    /// A tensor of `shape` (an output of this layer, or an input of it with `channels` its
    /// input channels) as (outer, channels, inner) around its channel axis.
    public func channelLayout(of shape: [Int], channels: Int? = nil) -> ChannelLayout {
        ChannelLayout(count: shape.product, channels: channels ?? outFeatures, inner: channelStride(of: shape))
    }

    /// Elements between consecutive output channels in a tensor of `shape`
    /// (1 for linear; the product of the spatial extents for conv).
    public func channelStride(of shape: [Int]) -> Int {
        if let normalization { return normalization.channelStride(of: shape) }
        return isConvolution ? shape[2...].reduce(1, *) : 1
    }
}
