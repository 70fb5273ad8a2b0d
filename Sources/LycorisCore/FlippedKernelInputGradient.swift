/// ∂x of a stride-1 convolution as a forward convolution: for y = conv(x, W) with stride 1,
/// dilation d, padding p (per axis) and one group, ∂x = conv(∂y, W̃) with
/// W̃[c, o, κ] = W[o, c, K−1−κ] (kernel flipped on every axis, channel axes swapped),
/// dilation d and padding d·(k−1) − p. It reads ∂y through im2col and writes ∂x once, where
/// ``Convolution/backwardInput(_:weight:geometry:inputShape:)`` scatters every patch back
/// through col2im (the costlier pass for 3×3 kernels on wide maps).
extension Convolution {
    /// ∂x (N, C, in…) from ∂y (N, O, out…), or nil when the geometry has a stride above 1,
    /// groups, or padding beyond d·(k−1) on some axis (the op's own backward then applies).
    public static func backwardInputByFlippedKernel(_ gradOutput: Tensor, weight: Tensor, geometry: ConvGeometry,
                                                    inputShape: [Int]) -> Tensor? {
        let axes = geometry.kernelSize.indices
        let reach = axes.map { geometry.dilation[$0] * (geometry.kernelSize[$0] - 1) }
        guard geometry.groups == 1, geometry.stride.allSatisfy({ $0 == 1 }),
              axes.allSatisfy({ geometry.padding[$0] <= reach[$0] }) else { return nil }
        let transposed = ConvGeometry(inChannels: geometry.outChannels, outChannels: geometry.inChannels,
                                      kernelSize: geometry.kernelSize, padding: axes.map { reach[$0] - geometry.padding[$0] },
                                      dilation: geometry.dilation)
        let gradInput = forward(gradOutput, weight: flippedTransposed(weight), geometry: transposed)
        precondition(gradInput.shape == inputShape, "flipped-kernel ∂x \(gradInput.shape) is not \(inputShape)")
        return gradInput
    }

    /// W̃ (C, O, k…) from W (O, C, k…): channel axes swapped, the flat kernel index reversed
    /// (which flips every kernel axis at once).
    static func flippedTransposed(_ weight: Tensor) -> Tensor {
        let (o, c) = (weight.shape[0], weight.shape[1])
        let taps = weight.shape[2...].reduce(1, *)
        var flipped = Tensor(uninitializedShape: [c, o] + Array(weight.shape[2...]))
        for i in 0..<o {
            for j in 0..<c {
                for t in 0..<taps { flipped.scalars[(j * o + i) * taps + taps - 1 - t] = weight.scalars[(i * c + j) * taps + t] }
            }
        }
        return flipped
    }
}
