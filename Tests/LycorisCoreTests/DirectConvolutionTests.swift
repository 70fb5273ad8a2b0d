import LycorisCore
import Testing

/// DirectConvolution at every instruction-set level this CPU runs (portable, AVX2, AVX-512),
/// on every stride-1 ungrouped case of ``ConvolutionTests`` plus shapes that cross the
/// kernels' blocks (outputs past 48 columns, channel counts not a multiple of 8, outputs
/// split over threads): exact against the naive Double loops on small integers, within
/// Float rounding of them and of im2col (``Convolution``) on uniform data, and ∂x, ∂W against
/// central differences of ½‖conv(x, W)‖².
@Suite struct DirectConvolutionTests {
    typealias Case = ConvolutionTests.Case
    typealias Level = DirectConvolution.Level

    static let cases: [Case] = {
        let shared = ConvolutionTests.cases.filter { DirectConvolution.supports($0.geometry) }
        let extras: [(ConvGeometry, [Int])] = [
            // LoCon's down convolution in small: 16 outputs, 3×3, padding 1, two column blocks
            // per row and enough work for every thread.
            (ConvGeometry(inChannels: 9, outChannels: 16, kernelSize: [3, 3], padding: [1, 1]), [1, 9, 8, 53]),
            // Odd channel counts (rows and weight columns past a block), dilation, anisotropic padding.
            (ConvGeometry(inChannels: 5, outChannels: 17, kernelSize: [3, 5], padding: [2, 1], dilation: [2, 1]), [2, 5, 9, 31]),
            // One output channel; the transposed pass has 1 input channel.
            (ConvGeometry(inChannels: 7, outChannels: 1, kernelSize: [2, 2]), [1, 7, 6, 50]),
            // Conv1d longer than a block, a Tucker-core-like r→r conv3d.
            (ConvGeometry(inChannels: 3, outChannels: 9, kernelSize: [5], padding: [2], dilation: [3]), [2, 3, 131]),
            (ConvGeometry(inChannels: 6, outChannels: 6, kernelSize: [3, 3, 3], padding: [1, 1, 1]), [1, 6, 5, 7, 9]),
            // ∂W past one pass of its kernel: more than 512 columns and more than 64 output rows.
            (ConvGeometry(inChannels: 3, outChannels: 70, kernelSize: [3, 3], padding: [1, 1]), [2, 3, 12, 60]),
        ]
        return shared + extras.enumerated().map { Case(geometry: $0.element.0, inputShape: $0.element.1, seed: 9000 + UInt64($0.offset)) }
    }()

    /// x, W and ∂y of a case from `make(shape, seed)` with seeds `seed`, `seed + 1`, `seed + 2`.
    static func data(_ c: Case, seed: UInt64, _ make: ([Int], UInt64) -> Tensor) -> (x: Tensor, w: Tensor, g: Tensor) {
        let layout = NaiveConv.Layout(c.geometry, inputShape: c.inputShape)
        return (make(c.inputShape, seed), make(layout.weightShape, seed + 1), make(layout.outputShape, seed + 2))
    }

    @Test func sharedCasesAreIncluded() {
        #expect(Self.cases.count > 25)
        #expect(Level.supported.first == .portable && Level.supported.contains(Level.best))
    }

    /// One ``DirectConvolution/PaddedInput`` (what a chain's tape keeps) serves the forward
    /// and then ∂W with the bits of padding x for each, on batches of several samples
    /// (each sample's slot at its own offset), and the kernels leave it unchanged.
    @Test(arguments: cases.filter { $0.inputShape[0] > 1 })
    func paddedInputServesForwardAndWeightGradient(_ c: Case) {
        let (x, w, g) = Self.data(c, seed: c.seed * 7, uniformTensor)
        let padded = DirectConvolution.PaddedInput(x, geometry: c.geometry)
        #expect(padded.inputShape == c.inputShape)
        let y = DirectConvolution.forward(padded, weight: w, geometry: c.geometry)
        let gw = DirectConvolution.backwardWeight(padded, gradOutput: g, geometry: c.geometry)
        #expect(y.scalars == DirectConvolution.forward(x, weight: w, geometry: c.geometry).scalars)
        #expect(gw.scalars == DirectConvolution.backwardWeight(x, gradOutput: g, geometry: c.geometry).scalars)
        #expect(DirectConvolution.forward(padded, weight: w, geometry: c.geometry).scalars == y.scalars)
    }

    /// Small integers: every product and partial sum is exact in Float, so any summation
    /// order gives the Double loops' value exactly.
    @Test(arguments: cases)
    func exactOnIntegers(_ c: Case) {
        let (x, w, g) = Self.data(c, seed: c.seed * 5, integerTensor)
        let expected = NaiveConv.forward(x, weight: w, geometry: c.geometry)
        let expectedInput = NaiveConv.backwardInput(g, weight: w, geometry: c.geometry, inputShape: c.inputShape)
        let expectedWeight = NaiveConv.backwardWeight(x, gradOutput: g, geometry: c.geometry)
        for level in Level.supported {
            let y = DirectConvolution.forward(x, weight: w, geometry: c.geometry, level: level)
            #expect(y.shape == expected.shape, "\(level)")
            #expect(y.scalars.map(Double.init) == expected.values, "\(level)")
            let gx = DirectConvolution.backwardInput(g, weight: w, geometry: c.geometry, inputShape: c.inputShape, level: level)
            #expect(gx.shape == c.inputShape, "\(level)")
            #expect(gx.scalars.map(Double.init) == expectedInput, "\(level)")
            let gw = DirectConvolution.backwardWeight(x, gradOutput: g, geometry: c.geometry, level: level)
            #expect(gw.shape == expectedWeight.shape, "\(level)")
            #expect(gw.scalars.map(Double.init) == expectedWeight.values, "\(level)")
        }
    }

    /// Uniform data: within Float rounding of the Double loops, and of im2col + GEMM.
    @Test(arguments: cases)
    func matchesReferenceOnUniform(_ c: Case) {
        let (x, w, g) = Self.data(c, seed: c.seed * 7, uniformTensor)
        let naive = [NaiveConv.forward(x, weight: w, geometry: c.geometry).values,
                     NaiveConv.backwardInput(g, weight: w, geometry: c.geometry, inputShape: c.inputShape),
                     NaiveConv.backwardWeight(x, gradOutput: g, geometry: c.geometry).values]
        let im2col = [Convolution.forward(x, weight: w, geometry: c.geometry),
                      Convolution.backwardInput(g, weight: w, geometry: c.geometry, inputShape: c.inputShape),
                      Convolution.backwardWeight(x, gradOutput: g, geometry: c.geometry)].map { $0.scalars.map(Double.init) }
        for level in Level.supported {
            let direct = [DirectConvolution.forward(x, weight: w, geometry: c.geometry, level: level),
                          DirectConvolution.backwardInput(g, weight: w, geometry: c.geometry, inputShape: c.inputShape, level: level),
                          DirectConvolution.backwardWeight(x, gradOutput: g, geometry: c.geometry, level: level)]
            let errors = (0..<3).flatMap { [relativeError(direct[$0].scalars, naive[$0]), relativeError(direct[$0].scalars, im2col[$0])] }
            #expect(errors.allSatisfy { $0 <= ConvolutionTests.tolerance }, "\(level): relative errors \(errors)")
        }
    }

    /// ∂L/∂x and ∂L/∂W of L = ½‖conv(x, W)‖² (so ∂y = y) against central differences at
    /// a spread of coordinates (L is quadratic: the difference is exact but for rounding).
    @Test(arguments: Array(cases.suffix(9)), Level.supported)
    func gradientsMatchFiniteDifferences(_ c: Case, _ level: Level) {
        let layout = NaiveConv.Layout(c.geometry, inputShape: c.inputShape)
        let x = uniformTensor(c.inputShape, seed: c.seed * 11)
        let w = uniformTensor(layout.weightShape, seed: c.seed * 11 + 1)
        func loss(_ x: Tensor, _ w: Tensor) -> Double {
            let y = DirectConvolution.forward(x, weight: w, geometry: c.geometry, level: level)
            return naiveDot(y.scalars, y.scalars) / 2
        }
        let y = DirectConvolution.forward(x, weight: w, geometry: c.geometry, level: level)
        let gx = DirectConvolution.backwardInput(y, weight: w, geometry: c.geometry, inputShape: c.inputShape, level: level)
        let gw = DirectConvolution.backwardWeight(x, gradOutput: y, geometry: c.geometry, level: level)
        let step: Float = 1e-2
        func difference(_ t: Tensor, at i: Int, _ evaluate: (Tensor) -> Double) -> Double {
            var plus = t, minus = t
            plus.scalars[i] += step
            minus.scalars[i] -= step
            return (evaluate(plus) - evaluate(minus)) / Double(2 * step)
        }
        let scaleX = gx.scalars.map { abs(Double($0)) }.max() ?? 1
        for i in Swift.stride(from: 0, to: x.count, by: Swift.max(1, x.count / 7)) {
            let numeric = difference(x, at: i) { loss($0, w) }
            #expect(abs(numeric - Double(gx.scalars[i])) <= 2e-3 * scaleX, "∂x[\(i)] \(gx.scalars[i]) vs \(numeric)")
        }
        let scaleW = gw.scalars.map { abs(Double($0)) }.max() ?? 1
        for i in Swift.stride(from: 0, to: w.count, by: Swift.max(1, w.count / 7)) {
            let numeric = difference(w, at: i) { loss(x, $0) }
            #expect(abs(numeric - Double(gw.scalars[i])) <= 2e-3 * scaleW, "∂W[\(i)] \(gw.scalars[i]) vs \(numeric)")
        }
    }

    @Test func supportsOnlyStrideOneUngroupedKernels() {
        let base = ConvGeometry(inChannels: 4, outChannels: 2, kernelSize: [3, 3], padding: [1, 1], dilation: [2, 1])
        #expect(DirectConvolution.supports(base))
        #expect(!DirectConvolution.supports(base.with(stride: [1, 2])))
        #expect(!DirectConvolution.supports(base.with(groups: 2)))
        #expect(!DirectConvolution.supports(base.with(kernelSize: [1, 1])))
    }
}
