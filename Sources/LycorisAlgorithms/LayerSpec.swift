import LycorisCore

/// The base layer an adapter is attached to, and its operation `op(x, W)` (no bias).
///
/// Linear: x (…, in) → y (…, out), `y = x · Wᵀ`, W (out, in).
/// Convolution, by the geometry's spatial rank:
/// - conv1d: x (N, C, L) → y (N, O, Lo), W (O, C/groups, k);
/// - conv2d: x (N, C, H, W) → y (N, O, Ho, Wo), W (O, C/groups, kh, kw);
/// - conv3d: x (N, C, D, H, W) → y (N, O, Do, Ho, Wo), W (O, C/groups, kd, kh, kw).
public enum LayerSpec: Sendable, Equatable, Hashable {
    case linear(inFeatures: Int, outFeatures: Int)
    case convolution(ConvGeometry)

    /// The base weight's shape.
    public var weightShape: [Int] {
        switch self {
        case let .linear(inFeatures, outFeatures): [outFeatures, inFeatures]
        case let .convolution(geometry): geometry.weightShape
        }
    }

    /// The wire name of the layer kind: `linear`, `conv1d`, `conv2d` or `conv3d`.
    public var kind: String {
        switch self {
        case .linear: "linear"
        case let .convolution(geometry): geometry.kind
        }
    }

    public var outFeatures: Int { weightShape[0] }
    /// Input features per output as the weight sees them (in, or in/groups for conv).
    public var weightInFeatures: Int { weightShape[1] }
    /// Input channels of the activation (in, or in_channels for conv).
    public var inputChannels: Int {
        switch self {
        case let .linear(inFeatures, _): inFeatures
        case let .convolution(geometry): geometry.inChannels
        }
    }
    /// Product of the kernel's spatial extents (1 for linear).
    public var kernelElements: Int { weightShape[2...].reduce(1, *) }
    public var kernelSize: [Int] { Array(weightShape[2...]) }
    public var isConvolution: Bool { if case .convolution = self { true } else { false } }

    /// Why this layer description cannot be used, or nil.
    public var invalidReason: String? {
        switch self {
        case let .linear(inFeatures, outFeatures):
            inFeatures > 0 && outFeatures > 0 ? nil : "linear features must be positive (in \(inFeatures), out \(outFeatures))"
        case let .convolution(geometry): geometry.invalidReason
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
        }
    }

    /// The output shape for an input of `shape`.
    public func outputShape(forInput shape: [Int]) -> [Int] {
        switch self {
        case let .linear(_, outFeatures): Array(shape.dropLast()) + [outFeatures]
        case let .convolution(geometry): [shape[0], geometry.outChannels] + geometry.outputSize(Array(shape[2...]))
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
        }
    }

    /// ∂x of `op(x, W)` given ∂y.
    public func backwardInput(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int]) -> Tensor {
        switch self {
        case let .linear(inFeatures, outFeatures):
            return Tensor.matmul(gradOutput.reshaped([-1, outFeatures]), weight.reshaped([outFeatures, inFeatures]))
                .reshaped(inputShape)
        case let .convolution(geometry):
            return Convolution.backwardInput(gradOutput, weight: weight, geometry: geometry, inputShape: inputShape)
        }
    }

    /// ∂W of `op(x, W)` given x and ∂y.
    public func backwardWeight(_ x: Tensor, gradOutput: Tensor) -> Tensor {
        switch self {
        case let .linear(inFeatures, outFeatures):
            return Tensor.matmul(gradOutput.reshaped([-1, outFeatures]), transposeA: true, x.reshaped([-1, inFeatures]))
        case let .convolution(geometry):
            return Convolution.backwardWeight(x, gradOutput: gradOutput, geometry: geometry)
        }
    }

    /// Adds the bias (out,) along the output-channel axis.
    public func addBias(_ y: inout Tensor, bias: Tensor) {
        let channels = outFeatures
        precondition(bias.count == channels, "bias of \(bias.count) for \(channels) outputs")
        let inner = channelStride(of: y.shape)
        bias.scalars.withUnsafeBufferPointer { b in
            y.scalars.withUnsafeMutableBufferPointer { out in
                // Blocks of `inner` elements share one channel; channels cycle.
                var index = 0
                while index < out.count {
                    for channel in 0..<channels {
                        let value = b[channel]
                        for i in index..<(index + inner) { out[i] += value }
                        index += inner
                    }
                }
            }
        }
    }

    /// Elements between consecutive output channels in a tensor of `shape`
    /// (1 for linear; the product of the spatial extents for conv).
    public func channelStride(of shape: [Int]) -> Int {
        isConvolution ? shape[2...].reduce(1, *) : 1
    }
}
