/// The geometry of a 2-D convolution, as torch.nn.Conv2d describes it.
public struct Conv2dGeometry: Sendable, Equatable, Hashable, Codable {
    public var inChannels: Int
    public var outChannels: Int
    public var kernel: (height: Int, width: Int) { (kernelSize[0], kernelSize[1]) }
    public var kernelSize: [Int]
    public var stride: [Int]
    public var padding: [Int]
    public var dilation: [Int]
    public var groups: Int

    public init(
        inChannels: Int, outChannels: Int, kernelSize: [Int],
        stride: [Int] = [1, 1], padding: [Int] = [0, 0], dilation: [Int] = [1, 1], groups: Int = 1
    ) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.kernelSize = kernelSize
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
    }

    /// The problem with this geometry, or nil when it is a valid convolution.
    public var invalidReason: String? {
        if [kernelSize, stride, padding, dilation].contains(where: { $0.count != 2 }) {
            return "kernel_size, stride, padding and dilation must each have 2 entries"
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

    /// Weight shape (out, in/groups, kh, kw).
    public var weightShape: [Int] { [outChannels, inChannels / groups, kernelSize[0], kernelSize[1]] }

    /// Output spatial size for an input of `height`×`width`:
    /// ⌊(H + 2p − d·(k−1) − 1)/s⌋ + 1 per axis.
    public func outputSize(height: Int, width: Int) -> (height: Int, width: Int) {
        func extent(_ size: Int, _ axis: Int) -> Int {
            let span = size + 2 * padding[axis] - dilation[axis] * (kernelSize[axis] - 1) - 1
            // Floor division (Swift's `/` truncates toward zero): a window that does not fit
            // gives an extent ≤ 0, as in torch.
            let steps = span >= 0 ? span / stride[axis] : -((-span + stride[axis] - 1) / stride[axis])
            return steps + 1
        }
        return (extent(height, 0), extent(width, 1))
    }

    /// The same geometry with another channel count / kernel (for adapter factors that
    /// share the layer's stride and padding).
    public func with(inChannels: Int? = nil, outChannels: Int? = nil, kernelSize: [Int]? = nil,
                     stride: [Int]? = nil, padding: [Int]? = nil, dilation: [Int]? = nil, groups: Int? = nil) -> Conv2dGeometry {
        Conv2dGeometry(inChannels: inChannels ?? self.inChannels, outChannels: outChannels ?? self.outChannels,
                       kernelSize: kernelSize ?? self.kernelSize, stride: stride ?? self.stride,
                       padding: padding ?? self.padding, dilation: dilation ?? self.dilation,
                       groups: groups ?? self.groups)
    }

    /// A 1×1, stride-1, unpadded convolution (a per-pixel linear map).
    public static func pointwise(inChannels: Int, outChannels: Int) -> Conv2dGeometry {
        Conv2dGeometry(inChannels: inChannels, outChannels: outChannels, kernelSize: [1, 1])
    }
}

/// Conv2d on NCHW tensors by im2col + GEMM, forward and both backwards.
///
/// For each image n and group g, with `cols` the (C/g·kh·kw, Ho·Wo) patch matrix:
/// `Y[n,g] = W_g · cols`, `∂W_g += ∂Y[n,g] · colsᵀ`, `∂cols = W_gᵀ · ∂Y[n,g]` (then col2im).
public enum Conv2d {
    /// y (N, O, Ho, Wo) = conv2d(x (N, C, H, W), weight (O, C/g, kh, kw)).
    public static func forward(_ input: Tensor, weight: Tensor, geometry: Conv2dGeometry) -> Tensor {
        precondition(input.rank == 4 && input.shape[1] == geometry.inChannels, "conv2d input \(input.shape) does not have \(geometry.inChannels) channels")
        precondition(weight.shape == geometry.weightShape, "conv2d weight \(weight.shape) is not \(geometry.weightShape)")
        let plan = Plan(geometry: geometry, height: input.shape[2], width: input.shape[3])
        let batch = input.shape[0]
        var output = Tensor.zeros([batch, geometry.outChannels, plan.outHeight, plan.outWidth])
        let groupWeights = plan.groupWeights(weight)
        for n in 0..<batch {
            for g in 0..<geometry.groups {
                let cols = plan.im2col(input, image: n, group: g)
                let y = Tensor.matmul(groupWeights[g], cols)
                plan.writeOutputBlock(y, into: &output, image: n, group: g)
            }
        }
        return output
    }

    /// ∂x (N, C, H, W) from ∂y (N, O, Ho, Wo).
    public static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: Conv2dGeometry, inputShape: [Int]) -> Tensor {
        let plan = Plan(geometry: geometry, height: inputShape[2], width: inputShape[3])
        precondition(gradOutput.shape == [inputShape[0], geometry.outChannels, plan.outHeight, plan.outWidth],
                     "conv2d output gradient \(gradOutput.shape) does not match input \(inputShape)")
        var gradInput = Tensor.zeros(inputShape)
        let groupWeights = plan.groupWeights(weight)
        for n in 0..<inputShape[0] {
            for g in 0..<geometry.groups {
                let gy = plan.outputBlock(gradOutput, image: n, group: g)
                let gcols = Tensor.matmul(groupWeights[g], transposeA: true, gy)
                plan.col2imAdd(gcols, into: &gradInput, image: n, group: g)
            }
        }
        return gradInput
    }

    /// ∂W (O, C/g, kh, kw) from the input and ∂y.
    public static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: Conv2dGeometry) -> Tensor {
        let plan = Plan(geometry: geometry, height: input.shape[2], width: input.shape[3])
        let outPerGroup = geometry.outChannels / geometry.groups
        var groupGrads = [Tensor](repeating: .zeros([outPerGroup, plan.patchLength]), count: geometry.groups)
        for n in 0..<input.shape[0] {
            for g in 0..<geometry.groups {
                let cols = plan.im2col(input, image: n, group: g)
                let gy = plan.outputBlock(gradOutput, image: n, group: g)
                Tensor.gemm(gy, cols, transposeB: true, beta: 1, into: &groupGrads[g])
            }
        }
        return Tensor.concatenate(groupGrads, axis: 0).reshaped(geometry.weightShape)
    }

    /// Index bookkeeping shared by the three passes.
    struct Plan {
        let geometry: Conv2dGeometry
        let height: Int, width: Int
        let outHeight: Int, outWidth: Int
        let channelsPerGroup: Int
        var patchLength: Int { channelsPerGroup * geometry.kernelSize[0] * geometry.kernelSize[1] }
        var outPixels: Int { outHeight * outWidth }

        init(geometry: Conv2dGeometry, height: Int, width: Int) {
            self.geometry = geometry
            self.height = height
            self.width = width
            (outHeight, outWidth) = geometry.outputSize(height: height, width: width)
            precondition(outHeight > 0 && outWidth > 0, "conv2d input \(height)×\(width) is too small for the kernel")
            channelsPerGroup = geometry.inChannels / geometry.groups
        }

        func groupWeights(_ weight: Tensor) -> [Tensor] {
            let outPerGroup = geometry.outChannels / geometry.groups
            let matrix = weight.reshaped([geometry.outChannels, patchLength])
            return (0..<geometry.groups).map { matrix.slice(axis: 0, ($0 * outPerGroup)..<(($0 + 1) * outPerGroup)) }
        }

        /// Visits every (patch row, output pixel, input offset or nil for padding).
        @inline(__always)
        func forEachTap(_ body: (_ row: Int, _ column: Int, _ source: Int?) -> Void) {
            let (kh, kw) = geometry.kernel
            for c in 0..<channelsPerGroup {
                for i in 0..<kh {
                    for j in 0..<kw {
                        let row = (c * kh + i) * kw + j
                        for oy in 0..<outHeight {
                            let iy = oy * geometry.stride[0] - geometry.padding[0] + i * geometry.dilation[0]
                            for ox in 0..<outWidth {
                                let ix = ox * geometry.stride[1] - geometry.padding[1] + j * geometry.dilation[1]
                                let inside = iy >= 0 && iy < height && ix >= 0 && ix < width
                                body(row, oy * outWidth + ox, inside ? (c * height + iy) * width + ix : nil)
                            }
                        }
                    }
                }
            }
        }

        func im2col(_ input: Tensor, image n: Int, group g: Int) -> Tensor {
            var cols = [Float](repeating: 0, count: patchLength * outPixels)
            let base = (n * geometry.inChannels + g * channelsPerGroup) * height * width
            let pixels = outPixels
            input.scalars.withUnsafeBufferPointer { x in
                cols.withUnsafeMutableBufferPointer { out in
                    forEachTap { row, column, source in
                        if let source { out[row * pixels + column] = x[base + source] }
                    }
                }
            }
            return Tensor(shape: [patchLength, outPixels], scalars: cols)
        }

        func col2imAdd(_ cols: Tensor, into gradInput: inout Tensor, image n: Int, group g: Int) {
            let base = (n * geometry.inChannels + g * channelsPerGroup) * height * width
            let pixels = outPixels
            cols.scalars.withUnsafeBufferPointer { c in
                gradInput.scalars.withUnsafeMutableBufferPointer { gx in
                    forEachTap { row, column, source in
                        if let source { gx[base + source] += c[row * pixels + column] }
                    }
                }
            }
        }

        /// The (O/g, Ho·Wo) block of an NCHW output tensor for image n, group g.
        func outputBlock(_ output: Tensor, image n: Int, group g: Int) -> Tensor {
            let outPerGroup = geometry.outChannels / geometry.groups
            let start = (n * geometry.outChannels + g * outPerGroup) * outPixels
            return Tensor(shape: [outPerGroup, outPixels], scalars: Array(output.scalars[start..<(start + outPerGroup * outPixels)]))
        }

        func writeOutputBlock(_ block: Tensor, into output: inout Tensor, image n: Int, group g: Int) {
            let outPerGroup = geometry.outChannels / geometry.groups
            let start = (n * geometry.outChannels + g * outPerGroup) * outPixels
            output.scalars.replaceSubrange(start..<(start + block.count), with: block.scalars)
        }
    }
}
