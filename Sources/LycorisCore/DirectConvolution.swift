import CLycorisConvKernels

/// Stride-1, ungrouped convolution without a patch matrix: forward and both backwards, for
/// the adapters' factor convolutions (LoCon's down and Tucker core, the LoHa and DyLoRA
/// chains), which have few channels on one side and for which im2col's (C·K, P) patch
/// matrix costs more than the products.
///
/// Each sample's input is copied once into a zero-padded volume Xp (C, Dp, Hp, Wp) stored
/// flat (Dp = D + 2p₀, …), so that kernel tap t = (a, i, j) is the fixed offset
/// `off[t] = (a·d₀·Hp + i·d₁)·Wp + j·d₂` and output (z, y, x) is column
/// `q = (z·Hp + y)·Wp + x`:
///
///     Y[o, q]     = Σ_c Σ_t W[o, c, t] · Xp[c, q + off[t]]
///     ∂Xp[c, q']  = Σ_o Σ_t W[o, c, t] · ∂Y[o, q' − off[t]]     (∂Y zero off the outputs)
///     ∂W[o, c, t] = Σ_q ∂Y[o, q] · Xp[c, q + off[t]]
///
/// Every column q < Q = ((od−1)·Hp + oh−1)·Wp + ow is computed, the Wp − ow past each output
/// row included (dropped, or zero in ∂Y). The kernels (CLycorisConvKernels) run on column
/// blocks or weight columns split over the engine's threads (``ParallelRanges``). They add
/// the terms in another order than ``Convolution``'s im2col + GEMM, so the two differ by
/// rounding; a layer's own op(x, W) stays on ``Convolution``.
public enum DirectConvolution {
    /// The instruction set the kernels use.
    public enum Level: Int32, Sendable, CaseIterable {
        case portable = 0, avx2 = 1, avx512 = 2

        /// The best this CPU runs (checked once).
        public static let best = Level(rawValue: lycoris_conv_best_level()) ?? .portable
        /// Every level this CPU runs.
        public static var supported: [Level] { allCases.filter { $0.rawValue <= best.rawValue } }
    }

    /// Stride 1 on every axis, one group and more than one kernel tap (a pointwise
    /// convolution is a GEMM on the input as it is: ``Convolution`` needs no patch matrix
    /// there).
    public static func supports(_ geometry: ConvGeometry) -> Bool {
        geometry.groups == 1 && geometry.stride.allSatisfy { $0 == 1 } && geometry.kernelSize.reduce(1, *) > 1
    }

    /// The input x (N, C, in…) of one geometry as the kernels read it: each sample's
    /// zero-padded volume Xp, so that a backward's ∂W reads the forward's copy instead of
    /// padding x again (``OperatorChain`` keeps it on the step's tape).
    public struct PaddedInput: Sendable {
        /// The shape of x.
        public let inputShape: [Int]
        let frame: Frame
        /// N slots of `sampleLength` floats, slot n holding sample n's Xp and its zero tail.
        let scalars: [Float]
        var sampleLength: Int { frame.paddedLength }

        /// Pads every sample of `input` for `geometry`.
        public init(_ input: Tensor, geometry: ConvGeometry) {
            precondition(input.rank == 2 + geometry.spatialRank && input.shape[1] == geometry.inChannels,
                         "\(geometry.kind) input \(input.shape) does not have \(geometry.inChannels) channels and \(geometry.spatialRank) spatial axes")
            let frame = Frame(geometry: geometry, inputShape: input.shape)
            var scalars = [Float](repeating: 0, count: input.shape[0] * frame.paddedLength)
            for n in 0..<input.shape[0] { frame.pad(input, sample: n, into: &scalars, at: n * frame.paddedLength) }
            (self.inputShape, self.frame, self.scalars) = (input.shape, frame, scalars)
        }

        /// Whether this was padded for `geometry` (the one a kernel call names).
        func matches(_ geometry: ConvGeometry) -> Bool { frame.geometry == geometry }
    }

    /// y (N, O, out…) = conv(x (N, C, in…), weight (O, C, k…)).
    public static func forward(_ input: Tensor, weight: Tensor, geometry: ConvGeometry, level: Level = .best) -> Tensor {
        forward(PaddedInput(input, geometry: geometry), weight: weight, geometry: geometry, level: level)
    }

    /// y (N, O, out…) = conv(x, weight) from x already padded.
    public static func forward(_ padded: PaddedInput, weight: Tensor, geometry: ConvGeometry, level: Level = .best) -> Tensor {
        precondition(padded.matches(geometry), "\(geometry.kind) input was padded for another geometry")
        precondition(weight.shape == geometry.weightShape, "\(geometry.kind) weight \(weight.shape) is not \(geometry.weightShape)")
        let frame = padded.frame
        let rows = roundUp(frame.outChannels, Int(LYCORIS_CONV_ROW_BLOCK))
        let wT = transposedWeight(weight, outer: frame.outChannels, inner: frame.channels, taps: frame.taps, rows: rows)
        var extended = uninitialized(rows * frame.blockedColumns)
        var output = Tensor(uninitializedShape: frame.plan.outputShape(batch: padded.inputShape[0]))
        for n in 0..<padded.inputShape[0] {
            correlate(level, out: &extended, ldo: frame.blockedColumns, in: padded.scalars, start: n * padded.sampleLength,
                      ldi: frame.volume, weights: wT, rows: rows, channels: frame.channels, offsets: frame.offsets,
                      columns: frame.blockedColumns)
            frame.extractOutput(extended, ld: frame.blockedColumns, into: &output, sample: n)
        }
        return output
    }

    /// ∂x (N, C, in…) from ∂y (N, O, out…).
    public static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: ConvGeometry, inputShape: [Int],
                                     level: Level = .best) -> Tensor {
        let frame = Frame(geometry: geometry, inputShape: inputShape)
        precondition(gradOutput.shape == frame.plan.outputShape(batch: inputShape[0]),
                     "\(geometry.kind) output gradient \(gradOutput.shape) does not match input \(inputShape)")
        precondition(weight.shape == geometry.weightShape, "\(geometry.kind) weight \(weight.shape) is not \(geometry.weightShape)")
        // The transposed correlation: O input channels, C output rows, offsets reflected
        // (lead − off[t]) onto ∂Y shifted right by lead = the largest offset.
        let rows = roundUp(frame.channels, Int(LYCORIS_CONV_ROW_BLOCK))
        let wT = weight.scalars.withUnsafeBufferPointer { w in
            [Float](unsafeUninitializedCapacity: frame.outChannels * frame.taps * rows) { buffer, count in
                count = buffer.count
                buffer.initialize(repeating: 0)
                for o in 0..<frame.outChannels {
                    for c in 0..<frame.channels {
                        for t in 0..<frame.taps { buffer[(o * frame.taps + t) * rows + c] = w[(o * frame.channels + c) * frame.taps + t] }
                    }
                }
            }
        }
        let lead = frame.offsets[frame.taps - 1]
        let reflected = frame.offsets.map { lead - $0 }
        let columns = roundUp(frame.volume, Int(LYCORIS_CONV_COLUMN_BLOCK))
        let ldg = columns + lead
        var spread = [Float](repeating: 0, count: frame.outChannels * ldg)
        var gradPadded = uninitialized(rows * columns)
        var gradInput = Tensor(uninitializedShape: inputShape)
        for n in 0..<inputShape[0] {
            frame.spreadGradient(gradOutput, sample: n, into: &spread, ld: ldg, lead: lead)
            correlate(level, out: &gradPadded, ldo: columns, in: spread, start: 0, ldi: ldg, weights: wT, rows: rows,
                      channels: frame.outChannels, offsets: reflected, columns: columns)
            frame.extractInterior(gradPadded, ld: columns, into: &gradInput, sample: n)
        }
        return gradInput
    }

    /// ∂W (O, C, k…) from the input and ∂y.
    public static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: ConvGeometry, level: Level = .best) -> Tensor {
        backwardWeight(PaddedInput(input, geometry: geometry), gradOutput: gradOutput, geometry: geometry, level: level)
    }

    /// ∂W (O, C, k…) from the input already padded (the forward's) and ∂y.
    public static func backwardWeight(_ padded: PaddedInput, gradOutput: Tensor, geometry: ConvGeometry,
                                      level: Level = .best) -> Tensor {
        precondition(padded.matches(geometry), "\(geometry.kind) input was padded for another geometry")
        let frame = padded.frame
        precondition(gradOutput.shape == frame.plan.outputShape(batch: padded.inputShape[0]),
                     "\(geometry.kind) output gradient \(gradOutput.shape) does not match input \(padded.inputShape)")
        let rows = roundUp(frame.outChannels, Int(LYCORIS_CONV_ROW_BLOCK))
        let weightColumns = frame.channels * frame.taps
        let starts = (0..<weightColumns).map { j in (j / frame.taps) * frame.volume + frame.offsets[j % frame.taps] }
        var spread = [Float](repeating: 0, count: rows * frame.blockedColumns)
        var gradients = uninitialized(rows * weightColumns)
        for n in 0..<padded.inputShape[0] {
            frame.spreadGradient(gradOutput, sample: n, into: &spread, ld: frame.blockedColumns, lead: 0)
            let workers = ParallelRanges.workers(count: weightColumns, workPerItem: rows * frame.blockedColumns / 16)
            padded.scalars.withUnsafeBufferPointer { xp in
                spread.withUnsafeBufferPointer { g in
                    starts.withUnsafeBufferPointer { starts in
                        gradients.withUnsafeMutableBufferPointer { gw in
                            ParallelRanges.run(count: weightColumns, workers: workers) { range, _ in
                                lycoris_conv_weight_gradient(level.rawValue, gw.baseAddress!, weightColumns, g.baseAddress!,
                                                             frame.blockedColumns, rows, xp.baseAddress! + n * padded.sampleLength,
                                                             starts.baseAddress!, range.lowerBound, range.upperBound,
                                                             frame.blockedColumns, n > 0 ? 1 : 0)
                            }
                        }
                    }
                }
            }
        }
        return Tensor(shape: geometry.weightShape, scalars: Array(gradients.prefix(frame.outChannels * weightColumns)))
    }

    // MARK: Kernels

    /// The weight (O, C, K) as (C·K, rows) with rows ≥ O zero-filled: the column the
    /// correlation kernel broadcasts from.
    private static func transposedWeight(_ weight: Tensor, outer: Int, inner: Int, taps: Int, rows: Int) -> [Float] {
        weight.scalars.withUnsafeBufferPointer { w in
            [Float](unsafeUninitializedCapacity: inner * taps * rows) { buffer, count in
                count = buffer.count
                buffer.initialize(repeating: 0)
                for o in 0..<outer {
                    for j in 0..<(inner * taps) { buffer[j * rows + o] = w[o * inner * taps + j] }
                }
            }
        }
    }

    /// `out[o, n] = Σ_c Σ_t weights[c·K + t, o] · in[start + c·ldi + n + offsets[t]]` for
    /// n < columns (a multiple of the column block), column blocks split over the threads.
    private static func correlate(_ level: Level, out: inout [Float], ldo: Int, in input: [Float], start: Int, ldi: Int,
                                  weights: [Float],
                                  rows: Int, channels: Int, offsets: [Int], columns: Int) {
        let block = Int(LYCORIS_CONV_COLUMN_BLOCK)
        let blocks = columns / block
        let workers = ParallelRanges.workers(count: blocks, workPerItem: block * rows * channels * offsets.count / 16)
        input.withUnsafeBufferPointer { x in
            weights.withUnsafeBufferPointer { w in
                offsets.withUnsafeBufferPointer { offsets in
                    out.withUnsafeMutableBufferPointer { y in
                        ParallelRanges.run(count: blocks, workers: workers) { range, _ in
                            lycoris_conv_correlate(level.rawValue, y.baseAddress!, ldo, x.baseAddress! + start, ldi, w.baseAddress!, rows,
                                                   channels, offsets.baseAddress!, offsets.count,
                                                   range.lowerBound * block, range.upperBound * block)
                        }
                    }
                }
            }
        }
    }

    /// Scratch the kernels write in full before it is read.
    private static func uninitialized(_ count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { _, initialized in initialized = count }
    }

    private static func roundUp(_ value: Int, _ multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }

    /// The padded layout of one geometry and input shape.
    struct Frame: Sendable {
        let geometry: ConvGeometry
        let plan: Convolution.Plan
        let channels: Int, outChannels: Int, taps: Int
        /// Padded extents (depth, height, width) and their product.
        let paddedDepth: Int, paddedHeight: Int, paddedWidth: Int
        var volume: Int { paddedDepth * paddedHeight * paddedWidth }
        /// off[t] for the taps in weight order (a, i, j); increasing, so the last is the largest.
        let offsets: [Int]
        /// Q rounded up to the column block.
        let blockedColumns: Int

        init(geometry: ConvGeometry, inputShape: [Int]) {
            precondition(DirectConvolution.supports(geometry), "direct convolution needs stride 1, one group and a kernel: \(geometry)")
            self.geometry = geometry
            plan = Convolution.Plan(geometry: geometry, inputShape: inputShape)
            channels = geometry.inChannels
            outChannels = geometry.outChannels
            let k = plan.kernel, d = plan.dilation
            taps = k[0] * k[1] * k[2]
            paddedDepth = plan.depth + 2 * plan.padding[0]
            paddedHeight = plan.height + 2 * plan.padding[1]
            paddedWidth = plan.width + 2 * plan.padding[2]
            var offsets: [Int] = []
            for a in 0..<k[0] {
                for i in 0..<k[1] {
                    for j in 0..<k[2] { offsets.append((a * d[0] * paddedHeight + i * d[1]) * paddedWidth + j * d[2]) }
                }
            }
            self.offsets = offsets
            let columns = ((plan.outDepth - 1) * paddedHeight + plan.outHeight - 1) * paddedWidth + plan.outWidth
            blockedColumns = DirectConvolution.roundUp(columns, Int(LYCORIS_CONV_COLUMN_BLOCK))
        }

        /// The length of one sample's padded input: C volumes, long enough for every read of
        /// the kernels (the columns past Q read up to `blockedColumns + largest offset` into
        /// the last channel).
        var paddedLength: Int { (channels - 1) * volume + Swift.max(volume, blockedColumns + offsets[taps - 1]) }

        /// Copies sample n of x into the interior of the padded sample at `start` of `padded`
        /// (its border stays zero).
        func pad(_ x: Tensor, sample n: Int, into padded: inout [Float], at start: Int) {
            let (depth, height, width) = (plan.depth, plan.height, plan.width)
            let (p0, p1, p2) = (plan.padding[0], plan.padding[1], plan.padding[2])
            x.scalars.withUnsafeBufferPointer { x in
                padded.withUnsafeMutableBufferPointer { xp in
                    let source = x.baseAddress! + n * channels * depth * height * width
                    for c in 0..<channels {
                        for z in 0..<depth {
                            for y in 0..<height {
                                let from = source + ((c * depth + z) * height + y) * width
                                let to = xp.baseAddress! + start + c * volume + ((z + p0) * paddedHeight + y + p1) * paddedWidth + p2
                                to.update(from: from, count: width)
                            }
                        }
                    }
                }
            }
        }

        /// Calls `body(outputRowStart, column)` for every output row (z, y) of a sample:
        /// its first element in the (…, od, oh, ow) tensor and its column q in the frame.
        @inline(__always)
        private func forEachOutputRow(_ body: (Int, Int) -> Void) {
            for z in 0..<plan.outDepth {
                for y in 0..<plan.outHeight { body((z * plan.outHeight + y) * plan.outWidth, (z * paddedHeight + y) * paddedWidth) }
            }
        }

        /// y[n, o, z, y, :] = extended[o·ld + q(z, y) …].
        func extractOutput(_ extended: [Float], ld: Int, into output: inout Tensor, sample n: Int) {
            let positions = plan.outPositions, width = plan.outWidth
            extended.withUnsafeBufferPointer { e in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    for o in 0..<outChannels {
                        let target = y.baseAddress! + (n * outChannels + o) * positions
                        let source = e.baseAddress! + o * ld
                        forEachOutputRow { row, column in (target + row).update(from: source + column, count: width) }
                    }
                }
            }
        }

        /// ∂Y of sample n written at columns lead + q of each row (length `ld`) of `spread`;
        /// the other columns keep the zeros they were made with.
        func spreadGradient(_ gradOutput: Tensor, sample n: Int, into spread: inout [Float], ld: Int, lead: Int) {
            let positions = plan.outPositions, width = plan.outWidth
            gradOutput.scalars.withUnsafeBufferPointer { gy in
                spread.withUnsafeMutableBufferPointer { s in
                    for o in 0..<outChannels {
                        let source = gy.baseAddress! + (n * outChannels + o) * positions
                        let target = s.baseAddress! + o * ld + lead
                        forEachOutputRow { row, column in (target + column).update(from: source + row, count: width) }
                    }
                }
            }
        }

        /// ∂x[n] = the interior of the padded gradient (C rows of length `ld`).
        func extractInterior(_ gradPadded: [Float], ld: Int, into gradInput: inout Tensor, sample n: Int) {
            let (depth, height, width) = (plan.depth, plan.height, plan.width)
            let (p0, p1, p2) = (plan.padding[0], plan.padding[1], plan.padding[2])
            gradPadded.withUnsafeBufferPointer { g in
                gradInput.scalars.withUnsafeMutableBufferPointer { gx in
                    let target = gx.baseAddress! + n * channels * depth * height * width
                    for c in 0..<channels {
                        for z in 0..<depth {
                            for y in 0..<height {
                                let from = g.baseAddress! + c * ld + ((z + p0) * paddedHeight + y + p1) * paddedWidth + p2
                                (target + ((c * depth + z) * height + y) * width).update(from: from, count: width)
                            }
                        }
                    }
                }
            }
        }
    }
}
