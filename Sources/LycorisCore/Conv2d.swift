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
/// GEMMs read and write the NCHW tensors in place; one patch buffer serves every image.
/// A 1×1, stride-1, unpadded convolution needs no patch matrix: the image is one already.
public enum Conv2d {
    /// y (N, O, Ho, Wo) = conv2d(x (N, C, H, W), weight (O, C/g, kh, kw)).
    public static func forward(_ input: Tensor, weight: Tensor, geometry: Conv2dGeometry) -> Tensor {
        precondition(input.rank == 4 && input.shape[1] == geometry.inChannels, "conv2d input \(input.shape) does not have \(geometry.inChannels) channels")
        precondition(weight.shape == geometry.weightShape, "conv2d weight \(weight.shape) is not \(geometry.weightShape)")
        let plan = Plan(geometry: geometry, height: input.shape[2], width: input.shape[3])
        let batch = input.shape[0]
        var output = Tensor(uninitializedShape: [batch, geometry.outChannels, plan.outHeight, plan.outWidth])
        var cols = plan.patchBuffer()
        input.scalars.withUnsafeBufferPointer { x in
            weight.scalars.withUnsafeBufferPointer { w in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<batch {
                            for g in 0..<geometry.groups {
                                let patches = plan.patches(x.baseAddress!, image: n, group: g, buffer: cols.baseAddress)
                                BLAS.sgemm(transposeA: false, transposeB: false, m: plan.outPerGroup, n: plan.outPixels, k: plan.patchLength,
                                           alpha: 1, a: w.baseAddress! + g * plan.outPerGroup * plan.patchLength, lda: plan.patchLength,
                                           b: patches, ldb: plan.outPixels,
                                           beta: 0, c: y.baseAddress! + plan.outputOffset(image: n, group: g), ldc: plan.outPixels)
                            }
                        }
                    }
                }
            }
        }
        return output
    }

    /// ∂x (N, C, H, W) from ∂y (N, O, Ho, Wo).
    public static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: Conv2dGeometry, inputShape: [Int]) -> Tensor {
        let plan = Plan(geometry: geometry, height: inputShape[2], width: inputShape[3])
        precondition(gradOutput.shape == [inputShape[0], geometry.outChannels, plan.outHeight, plan.outWidth],
                     "conv2d output gradient \(gradOutput.shape) does not match input \(inputShape)")
        var gradInput = plan.isPointwise ? Tensor(uninitializedShape: inputShape) : Tensor.zeros(inputShape)
        var cols = plan.patchBuffer()
        gradOutput.scalars.withUnsafeBufferPointer { gy in
            weight.scalars.withUnsafeBufferPointer { w in
                gradInput.scalars.withUnsafeMutableBufferPointer { gx in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<inputShape[0] {
                            for g in 0..<geometry.groups {
                                // Pointwise: ∂x of the group is ∂cols itself.
                                let target = plan.isPointwise ? gx.baseAddress! + plan.inputOffset(image: n, group: g) : cols.baseAddress!
                                BLAS.sgemm(transposeA: true, transposeB: false, m: plan.patchLength, n: plan.outPixels, k: plan.outPerGroup,
                                           alpha: 1, a: w.baseAddress! + g * plan.outPerGroup * plan.patchLength, lda: plan.patchLength,
                                           b: gy.baseAddress! + plan.outputOffset(image: n, group: g), ldb: plan.outPixels,
                                           beta: 0, c: target, ldc: plan.outPixels)
                                if !plan.isPointwise { plan.col2imAdd(cols.baseAddress!, into: gx.baseAddress!, image: n, group: g) }
                            }
                        }
                    }
                }
            }
        }
        return gradInput
    }

    /// ∂W (O, C/g, kh, kw) from the input and ∂y.
    public static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: Conv2dGeometry) -> Tensor {
        let plan = Plan(geometry: geometry, height: input.shape[2], width: input.shape[3])
        var gradWeight = Tensor.zeros(geometry.weightShape)
        var cols = plan.patchBuffer()
        input.scalars.withUnsafeBufferPointer { x in
            gradOutput.scalars.withUnsafeBufferPointer { gy in
                gradWeight.scalars.withUnsafeMutableBufferPointer { gw in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<input.shape[0] {
                            for g in 0..<geometry.groups {
                                let patches = plan.patches(x.baseAddress!, image: n, group: g, buffer: cols.baseAddress)
                                BLAS.sgemm(transposeA: false, transposeB: true, m: plan.outPerGroup, n: plan.patchLength, k: plan.outPixels,
                                           alpha: 1, a: gy.baseAddress! + plan.outputOffset(image: n, group: g), lda: plan.outPixels,
                                           b: patches, ldb: plan.outPixels,
                                           beta: 1, c: gw.baseAddress! + g * plan.outPerGroup * plan.patchLength, ldc: plan.patchLength)
                            }
                        }
                    }
                }
            }
        }
        return gradWeight
    }

    /// Index bookkeeping shared by the three passes.
    struct Plan {
        let geometry: Conv2dGeometry
        let height: Int, width: Int
        let outHeight: Int, outWidth: Int
        let channelsPerGroup: Int
        let outPerGroup: Int
        var patchLength: Int { channelsPerGroup * geometry.kernelSize[0] * geometry.kernelSize[1] }
        var outPixels: Int { outHeight * outWidth }
        /// 1×1, stride 1, no padding: the (C/g, H·W) image slice is the patch matrix.
        let isPointwise: Bool

        init(geometry: Conv2dGeometry, height: Int, width: Int) {
            self.geometry = geometry
            self.height = height
            self.width = width
            (outHeight, outWidth) = geometry.outputSize(height: height, width: width)
            precondition(outHeight > 0 && outWidth > 0, "conv2d input \(height)×\(width) is too small for the kernel")
            channelsPerGroup = geometry.inChannels / geometry.groups
            outPerGroup = geometry.outChannels / geometry.groups
            isPointwise = geometry.kernelSize == [1, 1] && geometry.stride == [1, 1] && geometry.padding == [0, 0]
        }

        /// Scratch for one patch matrix (empty when pointwise); not zero-filled, since
        /// im2col and the GEMMs write every element before it is read.
        func patchBuffer() -> [Float] {
            let count = isPointwise ? 0 : patchLength * outPixels
            return [Float](unsafeUninitializedCapacity: count) { _, initialized in initialized = count }
        }

        func inputOffset(image n: Int, group g: Int) -> Int { (n * geometry.inChannels + g * channelsPerGroup) * height * width }
        func outputOffset(image n: Int, group g: Int) -> Int { (n * geometry.outChannels + g * outPerGroup) * outPixels }

        /// The (C/g·kh·kw, Ho·Wo) patch matrix of image n, group g: the input itself when
        /// pointwise, else im2col into `buffer`.
        func patches(_ input: UnsafePointer<Float>, image n: Int, group g: Int, buffer: UnsafeMutablePointer<Float>?) -> UnsafePointer<Float> {
            let source = input + inputOffset(image: n, group: g)
            if isPointwise { return source }
            let cols = buffer!
            let stride = geometry.stride[1]
            forEachRow { row, c, i, j in
                let dst = cols + row * outPixels
                let channel = source + c * height * width
                let (first, end, shift) = columnSpan(j)
                for oy in 0..<outHeight {
                    let line = dst + oy * outWidth
                    guard let iy = inputRow(oy: oy, i: i) else {
                        line.update(repeating: 0, count: outWidth)
                        continue
                    }
                    let inputRow = channel + iy * width
                    if first > 0 { line.update(repeating: 0, count: first) }
                    if stride == 1 {
                        if end > first { (line + first).update(from: inputRow + first + shift, count: end - first) }
                    } else {
                        for ox in first..<end { line[ox] = inputRow[ox * stride + shift] }
                    }
                    if end < outWidth { (line + end).update(repeating: 0, count: outWidth - end) }
                }
            }
            return UnsafePointer(cols)
        }

        /// Adds the patch-matrix gradient back onto the input gradient of image n, group g.
        func col2imAdd(_ cols: UnsafePointer<Float>, into gradInput: UnsafeMutablePointer<Float>, image n: Int, group g: Int) {
            let target = gradInput + inputOffset(image: n, group: g)
            let stride = geometry.stride[1]
            forEachRow { row, c, i, j in
                let src = cols + row * outPixels
                let channel = target + c * height * width
                let (first, end, shift) = columnSpan(j)
                for oy in 0..<outHeight {
                    guard let iy = inputRow(oy: oy, i: i) else { continue }
                    let inputRow = channel + iy * width
                    let line = src + oy * outWidth
                    for ox in first..<end { inputRow[ox * stride + shift] += line[ox] }
                }
            }
        }

        /// The output columns [first, end) whose tap at kernel column j lands inside the
        /// input row, and the input column of output column ox: ox·stride + shift.
        @inline(__always)
        private func columnSpan(_ j: Int) -> (first: Int, end: Int, shift: Int) {
            let shift = j * geometry.dilation[1] - geometry.padding[1]
            let stride = geometry.stride[1]
            // ox·s + shift ≥ 0 and ≤ width − 1.
            let first = shift >= 0 ? 0 : (-shift + stride - 1) / stride
            let last = width - 1 - shift
            let end = last < 0 ? 0 : Swift.min(outWidth, last / stride + 1)
            return (Swift.min(first, end), end, shift)
        }

        /// The input row read by output row oy at kernel row i, or nil in the padding.
        @inline(__always)
        private func inputRow(oy: Int, i: Int) -> Int? {
            let iy = oy * geometry.stride[0] - geometry.padding[0] + i * geometry.dilation[0]
            return iy >= 0 && iy < height ? iy : nil
        }

        /// Visits every patch row: (row, channel within the group, kernel y, kernel x).
        @inline(__always)
        private func forEachRow(_ body: (_ row: Int, _ channel: Int, _ i: Int, _ j: Int) -> Void) {
            let (kh, kw) = geometry.kernel
            for c in 0..<channelsPerGroup {
                for i in 0..<kh {
                    for j in 0..<kw { body((c * kh + i) * kw + j, c, i, j) }
                }
            }
        }
    }
}
