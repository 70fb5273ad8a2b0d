import LycorisCore
import Testing

/// Conv1d, Conv2d and Conv3d forward and both backwards against the direct convolution in
/// Double (`NaiveConv`), and the adjoint identities
/// ⟨conv(x, W), g⟩ = ⟨x, backwardInput(g)⟩ = ⟨W, backwardWeight(x, g)⟩.
@Suite struct ConvolutionTests {
    /// Relative tolerance for Float32 sums of ≤ 2·7·9·36 products against Double.
    static let tolerance = 1e-5

    struct Case: Sendable, CustomTestStringConvertible {
        var geometry: ConvGeometry
        var inputShape: [Int]
        var seed: UInt64

        var testDescription: String {
            let g = geometry
            return "x\(inputShape) C\(g.inChannels)→O\(g.outChannels) k\(g.kernelSize) s\(g.stride) p\(g.padding) d\(g.dilation) g\(g.groups)"
        }
    }

    /// Kernel 1×1, 3×3, 3×2 × stride 1, 2, [2,1] × padding 0, 1, [1,2] × dilation 1, 2 ×
    /// groups 1, 2 and depthwise, on a batch of two non-square 7×9 images; then a few
    /// further shapes (channel multipliers, padding wider than the kernel, tiny inputs).
    static let cases: [Case] = {
        var result: [Case] = []
        var seed: UInt64 = 1
        let channels: [(inC: Int, outC: Int, groups: Int)] = [(4, 6, 1), (4, 6, 2), (4, 4, 4)]
        for kernel in [[1, 1], [3, 3], [3, 2]] {
            for stride in [[1, 1], [2, 2], [2, 1]] {
                for padding in [[0, 0], [1, 1], [1, 2]] {
                    for dilation in [[1, 1], [2, 2]] {
                        for (inC, outC, groups) in channels {
                            let geometry = ConvGeometry(
                                inChannels: inC, outChannels: outC, kernelSize: kernel,
                                stride: stride, padding: padding, dilation: dilation, groups: groups)
                            result.append(Case(geometry: geometry, inputShape: [2, inC, 7, 9], seed: seed))
                            seed += 1
                        }
                    }
                }
            }
        }
        let extras: [(ConvGeometry, [Int])] = [
            // Depthwise with channel multiplier 2.
            (ConvGeometry(inChannels: 3, outChannels: 6, kernelSize: [3, 3], padding: [1, 1], groups: 3), [2, 3, 6, 5]),
            // Groups 2 with one output per group, strided.
            (ConvGeometry(inChannels: 6, outChannels: 2, kernelSize: [2, 3], stride: [3, 2], groups: 2), [1, 6, 8, 7]),
            // Padding wider than the kernel: border outputs see only padding.
            (ConvGeometry(inChannels: 2, outChannels: 3, kernelSize: [1, 1], padding: [2, 3]), [2, 2, 3, 4]),
            // Anisotropic dilation and stride.
            (ConvGeometry(inChannels: 2, outChannels: 2, kernelSize: [2, 3], stride: [1, 3], padding: [0, 1], dilation: [3, 1]), [1, 2, 8, 10]),
            // A 1×1 input that only the padding makes large enough.
            (ConvGeometry(inChannels: 3, outChannels: 2, kernelSize: [3, 3], padding: [1, 1]), [2, 3, 1, 1]),
            // Input exactly the size of the dilated kernel: a single output pixel.
            (ConvGeometry(inChannels: 2, outChannels: 4, kernelSize: [3, 2], dilation: [2, 2]), [2, 2, 5, 3]),
            // Tall, thin input; stride larger than the kernel.
            (ConvGeometry(inChannels: 1, outChannels: 3, kernelSize: [2, 1], stride: [3, 1]), [2, 1, 11, 2]),
            // More channels per group (a deeper patch).
            (ConvGeometry(inChannels: 8, outChannels: 4, kernelSize: [3, 3], stride: [2, 2], padding: [1, 1], groups: 2), [2, 8, 6, 6]),
        ]
        for (geometry, shape) in extras {
            result.append(Case(geometry: geometry, inputShape: shape, seed: seed))
            seed += 1
        }
        // Conv1d: kernel 1, 3 × stride 1, 2 × padding 0, 2 × dilation 1, 2 × groups 1, 2 and
        // depthwise on a batch of two length-11 sequences.
        for kernel in [1, 3] {
            for stride in [1, 2] {
                for padding in [0, 2] {
                    for dilation in [1, 2] {
                        for (inC, outC, groups) in channels {
                            let geometry = ConvGeometry(
                                inChannels: inC, outChannels: outC, kernelSize: [kernel],
                                stride: [stride], padding: [padding], dilation: [dilation], groups: groups)
                            result.append(Case(geometry: geometry, inputShape: [2, inC, 11], seed: seed))
                            seed += 1
                        }
                    }
                }
            }
        }
        // Conv3d: kernel 1³, 3³ and (2, 3, 1) × stride 1, (2, 1, 2) × padding 0, (1, 0, 2) ×
        // dilation 1, (1, 2, 1) × groups 1, 2 on a batch of two 4×5×6 volumes; then
        // depthwise and a padding-only input.
        for kernel in [[1, 1, 1], [3, 3, 3], [2, 3, 1]] {
            for stride in [[1, 1, 1], [2, 1, 2]] {
                for padding in [[0, 0, 0], [1, 0, 2]] {
                    for dilation in [[1, 1, 1], [1, 2, 1]] {
                        for (inC, outC, groups) in channels.prefix(2) {
                            let geometry = ConvGeometry(
                                inChannels: inC, outChannels: outC, kernelSize: kernel,
                                stride: stride, padding: padding, dilation: dilation, groups: groups)
                            guard NaiveConv.Layout(geometry, inputShape: [2, inC, 4, 5, 6]).outSize.allSatisfy({ $0 > 0 }) else { continue }
                            result.append(Case(geometry: geometry, inputShape: [2, inC, 4, 5, 6], seed: seed))
                            seed += 1
                        }
                    }
                }
            }
        }
        let extras3d: [(ConvGeometry, [Int])] = [
            (ConvGeometry(inChannels: 3, outChannels: 6, kernelSize: [3, 3, 3], padding: [1, 1, 1], groups: 3), [1, 3, 3, 4, 5]),
            (ConvGeometry(inChannels: 2, outChannels: 3, kernelSize: [3, 3, 3], padding: [1, 1, 1]), [2, 2, 1, 1, 1]),
        ]
        for (geometry, shape) in extras3d {
            result.append(Case(geometry: geometry, inputShape: shape, seed: seed))
            seed += 1
        }
        return result
    }()

    private struct Inputs {
        let x: Tensor, w: Tensor, g: Tensor
        let layout: NaiveConv.Layout
    }

    private func inputs(_ c: Case) -> Inputs {
        let layout = NaiveConv.Layout(c.geometry, inputShape: c.inputShape)
        return Inputs(
            x: uniformTensor(c.inputShape, seed: c.seed * 3),
            w: uniformTensor(layout.weightShape, seed: c.seed * 3 + 1),
            g: uniformTensor(layout.outputShape, seed: c.seed * 3 + 2),
            layout: layout)
    }

    @Test(arguments: cases)
    func geometryIsValidAndMatchesNaiveShapes(_ c: Case) {
        #expect(c.geometry.invalidReason == nil)
        let layout = NaiveConv.Layout(c.geometry, inputShape: c.inputShape)
        #expect(layout.outSize.allSatisfy { $0 > 0 })
        #expect(c.geometry.weightShape == layout.weightShape)
        #expect(c.geometry.outputSize(Array(c.inputShape[2...])) == layout.outSize)
    }

    @Test(arguments: cases)
    func forwardMatchesDirectConvolution(_ c: Case) {
        let d = inputs(c)
        let y = Convolution.forward(d.x, weight: d.w, geometry: c.geometry)
        let expected = NaiveConv.forward(d.x, weight: d.w, geometry: c.geometry)
        #expect(y.shape == expected.shape)
        guard y.shape == expected.shape else { return }
        let error = relativeError(y.scalars, expected.values)
        #expect(error <= Self.tolerance, "relative error \(error)")
    }

    @Test(arguments: cases)
    func backwardInputMatchesNaiveAdjointLoop(_ c: Case) {
        let d = inputs(c)
        let gx = Convolution.backwardInput(d.g, weight: d.w, geometry: c.geometry, inputShape: c.inputShape)
        #expect(gx.shape == c.inputShape)
        let expected = NaiveConv.backwardInput(d.g, weight: d.w, geometry: c.geometry, inputShape: c.inputShape)
        let error = relativeError(gx.scalars, expected)
        #expect(error <= Self.tolerance, "relative error \(error)")
    }

    @Test(arguments: cases)
    func backwardWeightMatchesNaiveLoop(_ c: Case) {
        let d = inputs(c)
        let gw = Convolution.backwardWeight(d.x, gradOutput: d.g, geometry: c.geometry)
        let expected = NaiveConv.backwardWeight(d.x, gradOutput: d.g, geometry: c.geometry)
        #expect(gw.shape == expected.shape)
        guard gw.shape == expected.shape else { return }
        let error = relativeError(gw.scalars, expected.values)
        #expect(error <= Self.tolerance, "relative error \(error)")
    }

    /// ⟨conv(x, W), g⟩ = ⟨x, ∂x⟩ = ⟨W, ∂W⟩, each side from the library alone.
    @Test(arguments: cases)
    func adjointIdentities(_ c: Case) {
        let d = inputs(c)
        let y = Convolution.forward(d.x, weight: d.w, geometry: c.geometry)
        let gx = Convolution.backwardInput(d.g, weight: d.w, geometry: c.geometry, inputShape: c.inputShape)
        let gw = Convolution.backwardWeight(d.x, gradOutput: d.g, geometry: c.geometry)
        let viaOutput = naiveDot(y.scalars, d.g.scalars)
        let viaInput = naiveDot(d.x.scalars, gx.scalars)
        let viaWeight = naiveDot(d.w.scalars, gw.scalars)
        // Scale: Cauchy–Schwarz bounds on each inner product.
        let scale = max(naiveNorm(y.scalars) * naiveNorm(d.g.scalars),
                        naiveNorm(d.x.scalars) * naiveNorm(gx.scalars),
                        naiveNorm(d.w.scalars) * naiveNorm(gw.scalars))
        #expect(scale > 0)
        #expect(abs(viaOutput - viaInput) <= Self.tolerance * scale, "⟨y,g⟩ \(viaOutput) vs ⟨x,∂x⟩ \(viaInput)")
        #expect(abs(viaOutput - viaWeight) <= Self.tolerance * scale, "⟨y,g⟩ \(viaOutput) vs ⟨W,∂W⟩ \(viaWeight)")
    }

    /// A hand-computed case: a 3×3 input of 1…9, a 2×2 kernel of ones.
    @Test func forwardKnownValues() {
        let x = Tensor(shape: [1, 1, 3, 3], scalars: [1, 2, 3, 4, 5, 6, 7, 8, 9])
        let w = Tensor(repeating: 1, shape: [1, 1, 2, 2])
        let plain = Convolution.forward(x, weight: w, geometry: ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [2, 2]))
        #expect(plain == Tensor(shape: [1, 1, 2, 2], scalars: [12, 16, 24, 28]))
        let padded = Convolution.forward(x, weight: w, geometry: ConvGeometry(
            inChannels: 1, outChannels: 1, kernelSize: [2, 2], stride: [2, 2], padding: [1, 1]))
        #expect(padded == Tensor(shape: [1, 1, 2, 2], scalars: [1, 5, 11, 28]))
        let dilated = Convolution.forward(x, weight: w, geometry: ConvGeometry(
            inChannels: 1, outChannels: 1, kernelSize: [2, 2], dilation: [2, 2]))
        #expect(dilated == Tensor(shape: [1, 1, 1, 1], scalars: [20]))
    }

    /// A pointwise convolution is a per-position matrix product with the (O, C) weight, for
    /// every spatial rank.
    @Test(arguments: [[12], [4, 3], [2, 3, 2]])
    func pointwiseIsPerPositionMatmul(_ spatial: [Int]) {
        let geometry = ConvGeometry.pointwise(inChannels: 5, outChannels: 3, spatialRank: spatial.count)
        let ones = spatial.map { _ in 1 }
        let zeros = spatial.map { _ in 0 }
        #expect(geometry.kernelSize == ones && geometry.stride == ones && geometry.padding == zeros
                && geometry.dilation == ones && geometry.groups == 1)
        let x = uniformTensor([2, 5] + spatial, seed: 301)
        let w = uniformTensor([3, 5] + ones, seed: 302)
        let y = Convolution.forward(x, weight: w, geometry: geometry)
        let w2 = w.reshaped([3, 5])
        for n in 0..<2 {
            let sample = x.slice(axis: 0, n..<(n + 1)).reshaped([5, 12])
            let expected = Tensor.matmul(w2, sample)
            let got = y.slice(axis: 0, n..<(n + 1)).reshaped([3, 12])
            #expect(relativeError(got.scalars, expected.scalars.map(Double.init)) <= Self.tolerance)
        }
    }

    /// Hand-computed 1-D and 3-D cases: a sequence 1…5 and a 2×2×2 kernel of ones.
    @Test func forwardKnownValues1dAnd3d() {
        let sequence = Tensor(shape: [1, 1, 5], scalars: [1, 2, 3, 4, 5])
        let taps = Tensor(shape: [1, 1, 2], scalars: [1, -1])
        #expect(Convolution.forward(sequence, weight: taps, geometry: ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [2]))
                == Tensor(shape: [1, 1, 4], scalars: [-1, -1, -1, -1]))
        #expect(Convolution.forward(sequence, weight: taps, geometry: ConvGeometry(
            inChannels: 1, outChannels: 1, kernelSize: [2], stride: [2], padding: [1])) == Tensor(shape: [1, 1, 3], scalars: [-1, -1, -1]))
        let volume = Tensor(shape: [1, 1, 2, 2, 2], scalars: (1...8).map(Float.init))
        let cube = Tensor(repeating: 1, shape: [1, 1, 2, 2, 2])
        #expect(Convolution.forward(volume, weight: cube, geometry: ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [2, 2, 2]))
                == Tensor(shape: [1, 1, 1, 1, 1], scalars: [36]))
        // Padding 1 on depth only: two output planes, each the sum of one input plane.
        #expect(Convolution.forward(volume, weight: cube, geometry: ConvGeometry(
            inChannels: 1, outChannels: 1, kernelSize: [2, 2, 2], stride: [2, 1, 1], padding: [1, 0, 0]))
                == Tensor(shape: [1, 1, 2, 1, 1], scalars: [10, 26]))
    }

    // MARK: Geometry

    @Test func outputSizeKnownValues() {
        let resnetStem = ConvGeometry(inChannels: 3, outChannels: 64, kernelSize: [7, 7], stride: [2, 2], padding: [3, 3])
        #expect(resnetStem.outputSize([224, 224]) == [112, 112])
        let same = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 3], padding: [1, 1])
        #expect(same.outputSize([64, 37]) == [64, 37])
        let strided = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 3], stride: [2, 2])
        #expect(strided.outputSize([5, 6]) == [2, 2])
        let dilated = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 3], dilation: [2, 2])
        #expect(dilated.outputSize([7, 9]) == [3, 5])
        let mixed = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 2], stride: [2, 1], padding: [1, 2], dilation: [1, 2])
        #expect(mixed.outputSize([8, 5]) == [4, 7])
        #expect(ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3], stride: [2], padding: [1]).outputSize([9]) == [5])
        #expect(ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 1, 2], stride: [1, 2, 1], padding: [1, 0, 0],
                             dilation: [2, 1, 1]).outputSize([6, 5, 4]) == [4, 3, 3])
    }

    /// torch.nn.Conv2d: H_out = ⌊(H + 2p − d·(k − 1) − 1)/s + 1⌋, over a grid of
    /// geometries and every input size large enough for the dilated kernel.
    @Test(arguments: [1, 2, 3, 4], [1, 2, 3])
    func outputSizeMatchesTorchFormula(kernel: Int, stride: Int) {
        for padding in 0...2 {
            for dilation in 1...3 {
                let geometry = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [kernel, 1],
                                            stride: [stride, 1], padding: [padding, 0], dilation: [dilation, 1])
                for size in 1...20 where size + 2 * padding >= dilation * (kernel - 1) + 1 {
                    let expected = NaiveConv.outputExtent(size: size, kernel: kernel, stride: stride, padding: padding, dilation: dilation)
                    let got = geometry.outputSize([size, 3])
                    #expect(got[0] == expected, "H=\(size) k=\(kernel) s=\(stride) p=\(padding) d=\(dilation)")
                    #expect(got[1] == 3)
                }
            }
        }
    }

    /// An input smaller than the dilated kernel has no valid output position: the floor
    /// formula gives an extent ≤ 0 (torch rejects the input). Truncating division instead
    /// rounds a small negative quotient up to 0 and reports one output pixel, which lets
    /// `Conv2d`'s "too small for the kernel" precondition pass.
    @Test(arguments: [
        // (size, kernel, stride, padding, dilation)
        (2, 3, 2, 0, 1),
        (1, 3, 2, 0, 1),
        (3, 5, 3, 0, 1),
        (1, 2, 2, 0, 2),
        (2, 3, 1, 0, 1),
        (1, 3, 1, 0, 1),
        (1, 5, 2, 1, 1),
    ] as [(Int, Int, Int, Int, Int)])
    func outputSizeOfTooSmallInputIsNotPositive(size: Int, kernel: Int, stride: Int, padding: Int, dilation: Int) {
        let geometry = ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [kernel, kernel],
                                    stride: [stride, stride], padding: [padding, padding], dilation: [dilation, dilation])
        let expected = NaiveConv.outputExtent(size: size, kernel: kernel, stride: stride, padding: padding, dilation: dilation)
        #expect(expected <= 0)
        let got = geometry.outputSize([size, size])
        #expect(got == [expected, expected],
                "H=W=\(size) k=\(kernel) s=\(stride) p=\(padding) d=\(dilation): got \(got), floor formula \(expected)")
    }

    @Test func weightShape() {
        #expect(ConvGeometry(inChannels: 8, outChannels: 6, kernelSize: [3, 2], groups: 2).weightShape == [6, 4, 3, 2])
        #expect(ConvGeometry(inChannels: 5, outChannels: 5, kernelSize: [3, 3], groups: 5).weightShape == [5, 1, 3, 3])
        #expect(ConvGeometry.pointwise(inChannels: 7, outChannels: 2, spatialRank: 2).weightShape == [2, 7, 1, 1])
        #expect(ConvGeometry(inChannels: 8, outChannels: 6, kernelSize: [5], groups: 2).weightShape == [6, 4, 5])
        #expect(ConvGeometry(inChannels: 6, outChannels: 3, kernelSize: [3, 2, 1], groups: 3).weightShape == [3, 2, 3, 2, 1])
    }

    @Test func withReplacesOnlyTheGivenFields() {
        let base = ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], stride: [2, 1],
                                padding: [1, 2], dilation: [2, 1], groups: 2)
        #expect(base.with() == base)
        let changed = base.with(inChannels: 8, kernelSize: [1, 1], groups: 1)
        #expect(changed == ConvGeometry(inChannels: 8, outChannels: 6, kernelSize: [1, 1], stride: [2, 1],
                                        padding: [1, 2], dilation: [2, 1], groups: 1))
    }

    @Test func invalidReasonAcceptsValidGeometries() {
        #expect(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3]).invalidReason == nil)
        #expect(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [1, 2], stride: [2, 1],
                             padding: [0, 3], dilation: [1, 2], groups: 2).invalidReason == nil)
        #expect(ConvGeometry(inChannels: 4, outChannels: 8, kernelSize: [3, 3], groups: 4).invalidReason == nil)
        #expect(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3], stride: [2], padding: [1], groups: 2).invalidReason == nil)
        #expect(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 1, 2], dilation: [2, 1, 1]).invalidReason == nil)
    }

    @Test func kindNamesTheSpatialRank() {
        #expect(ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3]).kind == "conv1d")
        #expect(ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 3]).kind == "conv2d")
        #expect(ConvGeometry(inChannels: 1, outChannels: 1, kernelSize: [3, 3, 3]).kind == "conv3d")
    }

    @Test(arguments: [
        ("groups not dividing in", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: 3)),
        ("groups not dividing out", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: 4)),
        ("zero groups", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: 0)),
        ("negative groups", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: -2)),
        ("negative padding", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], padding: [0, -1])),
        ("zero kernel", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [0, 3])),
        ("negative kernel", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, -1])),
        ("zero stride", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], stride: [0, 1])),
        ("zero dilation", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], dilation: [1, 0])),
        ("zero in channels", ConvGeometry(inChannels: 0, outChannels: 6, kernelSize: [3, 3])),
        ("zero out channels", ConvGeometry(inChannels: 4, outChannels: 0, kernelSize: [3, 3])),
        ("empty kernel", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [])),
        ("4-entry kernel", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3, 3, 3])),
        ("1-entry kernel with 2-entry stride", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3], stride: [1, 1])),
        ("3-entry kernel with 2-entry dilation", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3, 3], dilation: [1, 1])),
        ("3-entry padding", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], padding: [1, 1, 1])),
        ("empty stride", ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], stride: [])),
    ] as [(String, ConvGeometry)])
    func invalidReasonRejects(_ what: String, _ geometry: ConvGeometry) {
        #expect(geometry.invalidReason != nil, "\(what) accepted")
    }

    @Test func invalidReasonNamesGroups() throws {
        let reason = try #require(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: 3).invalidReason)
        #expect(reason.contains("groups"))
    }
}
