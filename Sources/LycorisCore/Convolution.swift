/// Convolution with 1, 2 or 3 spatial axes on channel-first tensors (N, C, L),
/// (N, C, H, W) or (N, C, D, H, W), by im2col + GEMM: forward and both backwards.
///
/// For each sample n and group g, with `cols` the (C/g·K, P) patch matrix (K = Π kernel,
/// P = Π output extents): `Y[n,g] = W_g · cols`, `∂W_g += ∂Y[n,g] · colsᵀ`,
/// `∂cols = W_gᵀ · ∂Y[n,g]` (then col2im). GEMMs read and write the tensors in place; one
/// patch buffer serves every sample. A kernel-1, stride-1, unpadded convolution needs no
/// patch matrix: the sample is one already. Every case runs as a 3-D convolution whose
/// leading missing axes have extent 1 (kernel 1, stride 1, no padding).
public enum Convolution {
    /// y (N, O, out…) = conv(x (N, C, in…), weight (O, C/g, k…)).
    public static func forward(_ input: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor {
        precondition(input.rank == 2 + geometry.spatialRank && input.shape[1] == geometry.inChannels,
                     "\(geometry.kind) input \(input.shape) does not have \(geometry.inChannels) channels and \(geometry.spatialRank) spatial axes")
        precondition(weight.shape == geometry.weightShape, "\(geometry.kind) weight \(weight.shape) is not \(geometry.weightShape)")
        let plan = Plan(geometry: geometry, inputShape: input.shape)
        let batch = input.shape[0]
        var output = Tensor(uninitializedShape: plan.outputShape(batch: batch))
        var cols = plan.patchBuffer()
        input.scalars.withUnsafeBufferPointer { x in
            weight.scalars.withUnsafeBufferPointer { w in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<batch {
                            for g in 0..<geometry.groups {
                                let patches = plan.patches(x.baseAddress!, sample: n, group: g, buffer: cols.baseAddress)
                                BLAS.sgemm(transposeA: false, transposeB: false, m: plan.outPerGroup, n: plan.outPositions, k: plan.patchLength,
                                           alpha: 1, a: w.baseAddress! + g * plan.outPerGroup * plan.patchLength, lda: plan.patchLength,
                                           b: patches, ldb: plan.outPositions,
                                           beta: 0, c: y.baseAddress! + plan.outputOffset(sample: n, group: g), ldc: plan.outPositions)
                            }
                        }
                    }
                }
            }
        }
        return output
    }

    /// ∂x (N, C, in…) from ∂y (N, O, out…).
    public static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: ConvGeometry, inputShape: [Int]) -> Tensor {
        let plan = Plan(geometry: geometry, inputShape: inputShape)
        precondition(gradOutput.shape == plan.outputShape(batch: inputShape[0]),
                     "\(geometry.kind) output gradient \(gradOutput.shape) does not match input \(inputShape)")
        var gradInput = plan.isPointwise ? Tensor(uninitializedShape: inputShape) : Tensor.zeros(inputShape)
        var cols = plan.patchBuffer()
        gradOutput.scalars.withUnsafeBufferPointer { gy in
            weight.scalars.withUnsafeBufferPointer { w in
                gradInput.scalars.withUnsafeMutableBufferPointer { gx in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<inputShape[0] {
                            for g in 0..<geometry.groups {
                                // Pointwise: ∂x of the group is ∂cols itself.
                                let target = plan.isPointwise ? gx.baseAddress! + plan.inputOffset(sample: n, group: g) : cols.baseAddress!
                                BLAS.sgemm(transposeA: true, transposeB: false, m: plan.patchLength, n: plan.outPositions, k: plan.outPerGroup,
                                           alpha: 1, a: w.baseAddress! + g * plan.outPerGroup * plan.patchLength, lda: plan.patchLength,
                                           b: gy.baseAddress! + plan.outputOffset(sample: n, group: g), ldb: plan.outPositions,
                                           beta: 0, c: target, ldc: plan.outPositions)
                                if !plan.isPointwise { plan.col2imAdd(cols.baseAddress!, into: gx.baseAddress!, sample: n, group: g) }
                            }
                        }
                    }
                }
            }
        }
        return gradInput
    }

    /// ∂W (O, C/g, k…) from the input and ∂y.
    public static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: ConvGeometry) -> Tensor {
        let plan = Plan(geometry: geometry, inputShape: input.shape)
        var gradWeight = Tensor.zeros(geometry.weightShape)
        var cols = plan.patchBuffer()
        input.scalars.withUnsafeBufferPointer { x in
            gradOutput.scalars.withUnsafeBufferPointer { gy in
                gradWeight.scalars.withUnsafeMutableBufferPointer { gw in
                    cols.withUnsafeMutableBufferPointer { cols in
                        for n in 0..<input.shape[0] {
                            for g in 0..<geometry.groups {
                                let patches = plan.patches(x.baseAddress!, sample: n, group: g, buffer: cols.baseAddress)
                                BLAS.sgemm(transposeA: false, transposeB: true, m: plan.outPerGroup, n: plan.patchLength, k: plan.outPositions,
                                           alpha: 1, a: gy.baseAddress! + plan.outputOffset(sample: n, group: g), lda: plan.outPositions,
                                           b: patches, ldb: plan.outPositions,
                                           beta: 1, c: gw.baseAddress! + g * plan.outPerGroup * plan.patchLength, ldc: plan.patchLength)
                            }
                        }
                    }
                }
            }
        }
        return gradWeight
    }

    /// Index bookkeeping shared by the three passes, on the geometry padded to three
    /// spatial axes (depth, height, width; missing leading axes have extent 1).
    struct Plan {
        let geometry: ConvGeometry
        /// Per axis (depth, height, width): kernel, stride, padding, dilation, input and
        /// output extents.
        let kernel: [Int], stride: [Int], padding: [Int], dilation: [Int]
        let depth: Int, height: Int, width: Int
        let outDepth: Int, outHeight: Int, outWidth: Int
        let channelsPerGroup: Int
        let outPerGroup: Int
        var patchLength: Int { channelsPerGroup * kernel[0] * kernel[1] * kernel[2] }
        var outPositions: Int { outDepth * outHeight * outWidth }
        var inPositions: Int { depth * height * width }
        /// Kernel 1, stride 1, no padding: the (C/g, P) input slice is the patch matrix.
        let isPointwise: Bool

        init(geometry: ConvGeometry, inputShape: [Int]) {
            self.geometry = geometry
            let spatial = Array(inputShape.dropFirst(2))
            let out = geometry.outputSize(spatial)
            precondition(out.allSatisfy { $0 > 0 }, "\(geometry.kind) input \(spatial) is too small for the kernel")
            let lead = 3 - geometry.spatialRank
            func padded(_ values: [Int], _ fill: Int) -> [Int] { [Int](repeating: fill, count: lead) + values }
            kernel = padded(geometry.kernelSize, 1)
            stride = padded(geometry.stride, 1)
            padding = padded(geometry.padding, 0)
            dilation = padded(geometry.dilation, 1)
            let extents = padded(spatial, 1), outExtents = padded(out, 1)
            (depth, height, width) = (extents[0], extents[1], extents[2])
            (outDepth, outHeight, outWidth) = (outExtents[0], outExtents[1], outExtents[2])
            channelsPerGroup = geometry.inChannels / geometry.groups
            outPerGroup = geometry.outChannels / geometry.groups
            isPointwise = kernel == [1, 1, 1] && stride == [1, 1, 1] && padding == [0, 0, 0]
        }

        func outputShape(batch: Int) -> [Int] {
            [batch, geometry.outChannels] + [outDepth, outHeight, outWidth].suffix(geometry.spatialRank)
        }

        /// Scratch for one patch matrix (empty when pointwise); not zero-filled, since
        /// im2col and the GEMMs write every element before it is read. The empty case is a
        /// plain `[]`: `Array(unsafeUninitializedCapacity: 0)` stores its count into the
        /// process-wide empty-array storage, a data race (ThreadSanitizer) when two threads
        /// run pointwise convolutions.
        func patchBuffer() -> [Float] {
            let count = isPointwise ? 0 : patchLength * outPositions
            if count == 0 { return [] }
            return [Float](unsafeUninitializedCapacity: count) { _, initialized in initialized = count }
        }

        func inputOffset(sample n: Int, group g: Int) -> Int { (n * geometry.inChannels + g * channelsPerGroup) * inPositions }
        func outputOffset(sample n: Int, group g: Int) -> Int { (n * geometry.outChannels + g * outPerGroup) * outPositions }

        /// The (C/g·K, P) patch matrix of sample n, group g: the input itself when
        /// pointwise, else im2col into `buffer`.
        func patches(_ input: UnsafePointer<Float>, sample n: Int, group g: Int, buffer: UnsafeMutablePointer<Float>?) -> UnsafePointer<Float> {
            let source = input + inputOffset(sample: n, group: g)
            if isPointwise { return source }
            let cols = buffer!
            let stride = self.stride[2]
            let outPlane = outHeight * outWidth
            forEachRow { row, c, a, i, j in
                let dst = cols + row * outPositions
                let channel = source + c * inPositions
                let (first, end, shift) = columnSpan(j)
                for oz in 0..<outDepth {
                    let plane = dst + oz * outPlane
                    guard let iz = inputIndex(oz, tap: a, axis: 0) else {
                        plane.update(repeating: 0, count: outPlane)
                        continue
                    }
                    let inputPlane = channel + iz * height * width
                    for oy in 0..<outHeight {
                        let line = plane + oy * outWidth
                        guard let iy = inputIndex(oy, tap: i, axis: 1) else {
                            line.update(repeating: 0, count: outWidth)
                            continue
                        }
                        let inputRow = inputPlane + iy * width
                        if first > 0 { line.update(repeating: 0, count: first) }
                        if stride == 1 {
                            if end > first { (line + first).update(from: inputRow + first + shift, count: end - first) }
                        } else {
                            for ox in first..<end { line[ox] = inputRow[ox * stride + shift] }
                        }
                        if end < outWidth { (line + end).update(repeating: 0, count: outWidth - end) }
                    }
                }
            }
            return UnsafePointer(cols)
        }

        /// Adds the patch-matrix gradient back onto the input gradient of sample n, group g.
        func col2imAdd(_ cols: UnsafePointer<Float>, into gradInput: UnsafeMutablePointer<Float>, sample n: Int, group g: Int) {
            let target = gradInput + inputOffset(sample: n, group: g)
            let stride = self.stride[2]
            let outPlane = outHeight * outWidth
            forEachRow { row, c, a, i, j in
                let src = cols + row * outPositions
                let channel = target + c * inPositions
                let (first, end, shift) = columnSpan(j)
                for oz in 0..<outDepth {
                    guard let iz = inputIndex(oz, tap: a, axis: 0) else { continue }
                    let inputPlane = channel + iz * height * width
                    let plane = src + oz * outPlane
                    for oy in 0..<outHeight {
                        guard let iy = inputIndex(oy, tap: i, axis: 1) else { continue }
                        let inputRow = inputPlane + iy * width
                        let line = plane + oy * outWidth
                        for ox in first..<end { inputRow[ox * stride + shift] += line[ox] }
                    }
                }
            }
        }

        /// The output columns [first, end) whose tap at kernel column j lands inside the
        /// input row, and the input column of output column ox: ox·stride + shift.
        @inline(__always)
        private func columnSpan(_ j: Int) -> (first: Int, end: Int, shift: Int) {
            let shift = j * dilation[2] - padding[2]
            let stride = self.stride[2]
            // ox·s + shift ≥ 0 and ≤ width − 1.
            let first = shift >= 0 ? 0 : (-shift + stride - 1) / stride
            let last = width - 1 - shift
            let end = last < 0 ? 0 : Swift.min(outWidth, last / stride + 1)
            return (Swift.min(first, end), end, shift)
        }

        /// The input index along `axis` (0 depth, 1 height) read by output index `o` at
        /// kernel tap `tap`, or nil in the padding.
        @inline(__always)
        private func inputIndex(_ o: Int, tap: Int, axis: Int) -> Int? {
            let index = o * stride[axis] - padding[axis] + tap * dilation[axis]
            return index >= 0 && index < (axis == 0 ? depth : height) ? index : nil
        }

        /// Visits every patch row: (row, channel within the group, kernel z, y, x).
        @inline(__always)
        private func forEachRow(_ body: (_ row: Int, _ channel: Int, _ a: Int, _ i: Int, _ j: Int) -> Void) {
            let (kd, kh, kw) = (kernel[0], kernel[1], kernel[2])
            for c in 0..<channelsPerGroup {
                for a in 0..<kd {
                    for i in 0..<kh {
                        for j in 0..<kw { body(((c * kd + a) * kh + i) * kw + j, c, a, i, j) }
                    }
                }
            }
        }
    }
}
