/// A normalisation layer as torch.nn.LayerNorm and torch.nn.GroupNorm describe it, and its
/// affine op without the bias, `op(x, W) = x̂ ⊙ W`.
///
/// Layer norm: x (…, *normalized_shape) → same shape; every trailing block of
/// normalized_shape is normalised; W and b have shape normalized_shape.
/// Group norm: x (N, C, *spatial) → same shape (any number ≥ 0 of spatial axes); the C
/// channels form G groups of C/G, each (n, group) is normalised over its C/G channels ×
/// spatial positions; W and b have shape (C,).
///
///     x̂ = (x − μ) / √(σ² + eps)     μ, σ² the mean and biased variance of each block
///
/// In row-major order each normalised block is contiguous (L = Π normalized_shape, or
/// C/G·Π spatial), and element i uses weight element ⌊i / s⌋ mod K, K = W's element count
/// and s = 1 (layer norm) or Π spatial (group norm). Statistics are accumulated in Double.
public struct Normalization: Sendable, Equatable, Hashable {
    public enum Kind: Sendable, Equatable, Hashable {
        case layer(normalizedShape: [Int])
        case group(groups: Int, channels: Int)
    }

    public var kind: Kind
    /// ε, a double as in torch (statistics are computed in Double).
    public var eps: Double
    /// Whether the layer has an affine bias (torch's `bias=False` has none).
    public var hasBias: Bool

    public init(kind: Kind, eps: Double = 1e-5, hasBias: Bool = true) {
        self.kind = kind
        self.eps = eps
        self.hasBias = hasBias
    }

    /// The layer kind's wire name: `layer_norm` or `group_norm`.
    public var kindName: String {
        switch kind {
        case .layer: "layer_norm"
        case .group: "group_norm"
        }
    }

    /// The affine weight's (and bias's) shape: normalized_shape, or (C,).
    public var weightShape: [Int] {
        switch kind {
        case let .layer(normalizedShape): normalizedShape
        case let .group(_, channels): [channels]
        }
    }

    /// K: the affine weight's element count.
    public var channels: Int { weightShape.product }

    /// Why this description cannot be used, or nil.
    public var invalidReason: String? {
        if !(eps.isFinite && eps >= 0) { return "eps must be finite and non-negative, got \(eps)" }
        switch kind {
        case let .layer(normalizedShape):
            if normalizedShape.isEmpty || normalizedShape.contains(where: { $0 <= 0 }) {
                return "normalized_shape must be a non-empty list of positive extents, got \(normalizedShape)"
            }
        case let .group(groups, channels):
            if groups <= 0 || channels <= 0 { return "num_groups and num_channels must be positive (got \(groups), \(channels))" }
            if channels % groups != 0 { return "num_groups \(groups) must divide num_channels \(channels)" }
        }
        return nil
    }

    /// Why `shape` is not a valid input, or nil.
    public func inputProblem(_ shape: [Int]) -> String? {
        switch kind {
        case let .layer(normalizedShape):
            guard shape.count >= normalizedShape.count, Array(shape.suffix(normalizedShape.count)) == normalizedShape else {
                return "layer_norm input must end with \(normalizedShape), got shape \(shape)"
            }
        case let .group(_, channels):
            guard shape.count >= 2, shape[1] == channels else {
                return "group_norm input must be (N, \(channels), …), got shape \(shape)"
            }
        }
        return nil
    }

    /// s: elements between consecutive weight elements in an input of `shape`.
    public func channelStride(of shape: [Int]) -> Int {
        switch kind {
        case .layer: 1
        case .group: shape[2...].reduce(1, *)
        }
    }

    /// L: the length of one normalised block in an input of `shape`.
    private func blockLength(of shape: [Int]) -> Int {
        switch kind {
        case let .layer(normalizedShape): normalizedShape.product
        case let .group(groups, channels): channels / groups * shape[2...].reduce(1, *)
        }
    }

    /// Calls `body(block, μ, 1/√(σ² + eps))` for every normalised block of `x`.
    private func forEachBlock(_ x: UnsafeBufferPointer<Float>, length: Int, _ body: (Range<Int>, Double, Double) -> Void) {
        guard length > 0 else { return }
        var start = 0
        while start < x.count {
            let block = start..<(start + length)
            var sum = 0.0
            for i in block { sum += Double(x[i]) }
            let mean = sum / Double(length)
            var squares = 0.0
            for i in block {
                let d = Double(x[i]) - mean
                squares += d * d
            }
            body(block, mean, 1 / (squares / Double(length) + eps).squareRoot())
            start += length
        }
    }

    /// `op(x, W) = x̂ ⊙ W`.
    public func forward(_ x: Tensor, weight: Tensor) -> Tensor {
        precondition(weight.count == channels, "weight of \(weight.count) elements for \(channels) channels")
        let stride = channelStride(of: x.shape)
        var y = Tensor.zeros(x.shape)
        x.scalars.withUnsafeBufferPointer { xs in
            weight.scalars.withUnsafeBufferPointer { w in
                y.scalars.withUnsafeMutableBufferPointer { out in
                    forEachBlock(xs, length: blockLength(of: x.shape)) { block, mean, rstd in
                        for i in block { out[i] = Float((Double(xs[i]) - mean) * rstd * Double(w[(i / stride) % channels])) }
                    }
                }
            }
        }
        return y
    }

    /// ∂x of `op(x, W)` given ∂y: with ĝ = ∂y ⊙ W per block,
    /// ∂x = (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) / √(σ² + eps).
    public func backwardInput(_ gradOutput: Tensor, weight: Tensor, input x: Tensor) -> Tensor {
        precondition(gradOutput.shape == x.shape, "gradient \(gradOutput.shape) for input \(x.shape)")
        let stride = channelStride(of: x.shape)
        let length = blockLength(of: x.shape)
        var gradInput = Tensor.zeros(x.shape)
        x.scalars.withUnsafeBufferPointer { xs in
            gradOutput.scalars.withUnsafeBufferPointer { g in
                weight.scalars.withUnsafeBufferPointer { w in
                    gradInput.scalars.withUnsafeMutableBufferPointer { out in
                        forEachBlock(xs, length: length) { block, mean, rstd in
                            var gradSum = 0.0
                            var projection = 0.0
                            for i in block {
                                let scaled = Double(g[i]) * Double(w[(i / stride) % channels])
                                gradSum += scaled
                                projection += scaled * (Double(xs[i]) - mean) * rstd
                            }
                            let (gradMean, projectionMean) = (gradSum / Double(length), projection / Double(length))
                            for i in block {
                                let scaled = Double(g[i]) * Double(w[(i / stride) % channels])
                                let normalized = (Double(xs[i]) - mean) * rstd
                                out[i] = Float(rstd * (scaled - gradMean - normalized * projectionMean))
                            }
                        }
                    }
                }
            }
        }
        return gradInput
    }

    /// ∂W of `op(x, W)` given ∂y: Σ ∂y ⊙ x̂ over every element using each weight element.
    public func backwardWeight(_ x: Tensor, gradOutput: Tensor) -> Tensor {
        precondition(gradOutput.shape == x.shape, "gradient \(gradOutput.shape) for input \(x.shape)")
        let stride = channelStride(of: x.shape)
        var sums = [Double](repeating: 0, count: channels)
        x.scalars.withUnsafeBufferPointer { xs in
            gradOutput.scalars.withUnsafeBufferPointer { g in
                forEachBlock(xs, length: blockLength(of: x.shape)) { block, mean, rstd in
                    for i in block { sums[(i / stride) % channels] += Double(g[i]) * (Double(xs[i]) - mean) * rstd }
                }
            }
        }
        return Tensor(shape: weightShape, scalars: sums.map(Float.init))
    }
}
