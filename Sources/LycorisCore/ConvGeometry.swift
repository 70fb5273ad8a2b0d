/// The geometry of a 1-, 2- or 3-D convolution, as torch.nn.Conv1d/Conv2d/Conv3d describe
/// it: `kernelSize`, `stride`, `padding` and `dilation` each have one entry per spatial
/// axis (L; H, W; or D, H, W).
public struct ConvGeometry: Sendable, Equatable, Hashable, Codable {
    public var inChannels: Int
    public var outChannels: Int
    public var kernelSize: [Int]
    public var stride: [Int]
    public var padding: [Int]
    public var dilation: [Int]
    public var groups: Int

    /// The spatial axes supported: conv1d, conv2d and conv3d.
    public static let spatialRanks = 1...3

    /// `stride` and `dilation` default to 1 and `padding` to 0 on every axis of the kernel.
    public init(
        inChannels: Int, outChannels: Int, kernelSize: [Int],
        stride: [Int]? = nil, padding: [Int]? = nil, dilation: [Int]? = nil, groups: Int = 1
    ) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.kernelSize = kernelSize
        self.stride = stride ?? kernelSize.map { _ in 1 }
        self.padding = padding ?? kernelSize.map { _ in 0 }
        self.dilation = dilation ?? kernelSize.map { _ in 1 }
        self.groups = groups
    }

    /// Number of spatial axes (the kernel's entries): 1, 2 or 3 for a valid geometry.
    public var spatialRank: Int { kernelSize.count }

    /// `conv1d`, `conv2d` or `conv3d`.
    public var kind: String { "conv\(spatialRank)d" }

    /// The problem with this geometry, or nil when it is a valid convolution.
    public var invalidReason: String? {
        guard Self.spatialRanks.contains(spatialRank) else {
            return "kernel_size must have 1, 2 or 3 entries (conv1d, conv2d, conv3d), got \(spatialRank)"
        }
        if [stride, padding, dilation].contains(where: { $0.count != spatialRank }) {
            return "kernel_size, stride, padding and dilation must each have \(spatialRank) entries"
        }
        if inChannels <= 0 || outChannels <= 0 { return "channel counts must be positive" }
        if kernelSize.contains(where: { $0 <= 0 }) || stride.contains(where: { $0 <= 0 })
            || dilation.contains(where: { $0 <= 0 }) || padding.contains(where: { $0 < 0 }) {
            return "kernel, stride and dilation must be positive and padding non-negative"
        }
        if groups <= 0 || inChannels % groups != 0 || outChannels % groups != 0 {
            return "groups \(groups) must divide in_channels \(inChannels) and out_channels \(outChannels)"
        }
        return nil
    }

    /// Weight shape (out, in/groups, k…).
    public var weightShape: [Int] { [outChannels, inChannels / groups] + kernelSize }

    /// Output spatial extents for an input of spatial extents `size` (one per axis):
    /// ⌊(size + 2p − d·(k−1) − 1)/s⌋ + 1 per axis.
    public func outputSize(_ size: [Int]) -> [Int] {
        precondition(size.count == spatialRank, "\(kind) needs \(spatialRank) spatial extents, got \(size)")
        return size.indices.map { axis in
            let span = size[axis] + 2 * padding[axis] - dilation[axis] * (kernelSize[axis] - 1) - 1
            // Floor division (Swift's `/` truncates toward zero): a window that does not fit
            // gives an extent ≤ 0, as in torch.
            let steps = span >= 0 ? span / stride[axis] : -((-span + stride[axis] - 1) / stride[axis])
            return steps + 1
        }
    }

    /// The same geometry with another channel count / kernel (for adapter factors that
    /// share the layer's stride and padding).
    public func with(inChannels: Int? = nil, outChannels: Int? = nil, kernelSize: [Int]? = nil,
                     stride: [Int]? = nil, padding: [Int]? = nil, dilation: [Int]? = nil, groups: Int? = nil) -> ConvGeometry {
        ConvGeometry(inChannels: inChannels ?? self.inChannels, outChannels: outChannels ?? self.outChannels,
                     kernelSize: kernelSize ?? self.kernelSize, stride: stride ?? self.stride,
                     padding: padding ?? self.padding, dilation: dilation ?? self.dilation,
                     groups: groups ?? self.groups)
    }

    /// A kernel-1, stride-1, unpadded convolution with `spatialRank` axes (a per-position
    /// linear map).
    public static func pointwise(inChannels: Int, outChannels: Int, spatialRank: Int) -> ConvGeometry {
        ConvGeometry(inChannels: inChannels, outChannels: outChannels, kernelSize: [Int](repeating: 1, count: spatialRank))
    }
}
