import LycorisAlgorithms
import LycorisCore
import Testing

/// Gradients checked against central finite differences, independently of LyCORIS.
///
/// L(θ, x) = Σ g ⊙ y(θ, x) is linear in each single parameter element for every algorithm
/// here (products of distinct factors) but DoRA, and in each input element on linear and
/// conv layers, so the central difference with a large step is exact up to rounding; it is
/// taken in Float32 from the module's own forward. DoRA divides by a norm of the
/// parameters: its parameters use a small step. A norm layer's output is not linear in
/// x (the statistics depend on it): its ∂x uses a small step, whose O(h²) error is far
/// below the tolerance.
@Suite("Finite-difference gradients")
struct FiniteDifferenceTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let label: String
        let algorithm: Algorithm
        let layer: LayerSpec
        let options: AdapterOptions
        /// The input's shape where the layer kind does not fix it.
        var inputShape: [Int]? = nil
        /// The parameters' finite-difference step: Diag-OFT/BOFT are not linear in their
        /// blocks (Cayley transform), so a small step keeps the O(h²) error below tolerance.
        var parameterStep: Float = 0.25
        /// T-LoRA's timestep mask.
        var timestepMask: [Float]? = nil
        var testDescription: String { label }
    }

    static let conv = LayerSpec.convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1]))
    static let linear = LayerSpec.linear(inFeatures: 8, outFeatures: 6)
    /// Stride 1: the factor convolutions run on DirectConvolution.
    static let convStride1 = LayerSpec.convolution(ConvGeometry(inChannels: 5, outChannels: 6, kernelSize: [3, 3], padding: [1, 2],
                                                                dilation: [1, 2]))
    static let conv1d = LayerSpec.convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3], stride: [2], padding: [1]))
    static let conv3d = LayerSpec.convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 2, 3], stride: [1, 2, 1],
                                                           padding: [1, 0, 1]))

    static func options(_ edit: (inout AdapterOptions) -> Void) -> AdapterOptions {
        var options = AdapterOptions(rank: 2, alpha: 3)
        edit(&options)
        return options
    }

    static let boftLinear = LayerSpec.linear(inFeatures: 5, outFeatures: 8)
    static let boftConv = LayerSpec.convolution(ConvGeometry(inChannels: 4, outChannels: 8, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1]))

    static let cases: [Case] = [
        Case(label: "locon linear", algorithm: .locon, layer: linear, options: options { _ in }),
        Case(label: "locon linear bypass scalar", algorithm: .locon, layer: linear, options: options { $0.bypassMode = true; $0.useScalar = true }),
        Case(label: "locon conv", algorithm: .locon, layer: conv, options: options { _ in }),
        Case(label: "locon conv bypass tucker", algorithm: .locon, layer: conv, options: options { $0.bypassMode = true; $0.useTucker = true }),
        Case(label: "locon conv stride-1 bypass", algorithm: .locon, layer: convStride1, options: options { $0.bypassMode = true }),
        Case(label: "locon conv stride-1 bypass tucker scalar", algorithm: .locon, layer: convStride1,
             options: options { $0.bypassMode = true; $0.useTucker = true; $0.useScalar = true }),
        Case(label: "loha conv stride-1 bypass", algorithm: .loha, layer: convStride1, options: options { $0.bypassMode = true }),
        Case(label: "dylora conv stride-1 bypass", algorithm: .dylora, layer: convStride1,
             options: options { $0.rank = 4; $0.blockSize = 2; $0.bypassMode = true }),
        Case(label: "loha linear scalar", algorithm: .loha, layer: linear, options: options { $0.useScalar = true }),
        Case(label: "loha linear bypass scalar", algorithm: .loha, layer: linear, options: options { $0.bypassMode = true; $0.useScalar = true }),
        Case(label: "loha conv bypass", algorithm: .loha, layer: conv, options: options { $0.bypassMode = true }),
        Case(label: "loha conv1d bypass scalar", algorithm: .loha, layer: conv1d, options: options { $0.bypassMode = true; $0.useScalar = true }),
        Case(label: "loha conv tucker", algorithm: .loha, layer: conv, options: options { $0.useTucker = true }),
        Case(label: "lokr linear", algorithm: .lokr, layer: linear, options: options { $0.rank = 1 }),
        Case(label: "lokr linear bypass decompose", algorithm: .lokr, layer: .linear(inFeatures: 16, outFeatures: 24),
             options: options { $0.rank = 1; $0.decomposeBoth = true; $0.bypassMode = true; $0.useScalar = true }),
        Case(label: "lokr linear bypass full factors", algorithm: .lokr, layer: .linear(inFeatures: 15, outFeatures: 6),
             options: options { $0.rank = 4; $0.factor = -1; $0.bypassMode = true }, inputShape: [2, 3, 15]),
        Case(label: "lokr conv bypass low-rank w2", algorithm: .lokr,
             layer: .convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1])),
             options: options { $0.rank = 1; $0.bypassMode = true; $0.useScalar = true }),
        Case(label: "lokr conv tucker", algorithm: .lokr, layer: .convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], padding: [1, 1])),
             options: options { $0.rank = 1; $0.useTucker = true }),
        Case(label: "ia3 linear", algorithm: .ia3, layer: linear, options: options { _ in }),
        Case(label: "ia3 conv input bypass", algorithm: .ia3, layer: conv, options: options { $0.trainOnInput = true; $0.bypassMode = true }),
        Case(label: "ia3 linear output bypass", algorithm: .ia3, layer: linear, options: options { $0.bypassMode = true }),
        Case(label: "dylora conv", algorithm: .dylora, layer: conv, options: options { $0.rank = 4; $0.blockSize = 2 }),
        Case(label: "dylora linear bypass", algorithm: .dylora, layer: linear, options: options { $0.rank = 4; $0.blockSize = 2; $0.bypassMode = true }),
        Case(label: "locon conv1d bypass tucker scalar", algorithm: .locon, layer: conv1d,
             options: options { $0.bypassMode = true; $0.useTucker = true; $0.useScalar = true }),
        Case(label: "loha conv1d", algorithm: .loha, layer: conv1d, options: options { _ in }),
        Case(label: "lokr conv1d bypass", algorithm: .lokr, layer: conv1d, options: options { $0.rank = 1; $0.bypassMode = true }),
        Case(label: "dylora conv1d", algorithm: .dylora, layer: conv1d, options: options { $0.rank = 4; $0.blockSize = 2 }),
        Case(label: "locon conv3d", algorithm: .locon, layer: conv3d, options: options { _ in }),
        Case(label: "locon conv3d bypass tucker", algorithm: .locon, layer: conv3d, options: options { $0.bypassMode = true; $0.useTucker = true }),
        Case(label: "loha conv3d tucker", algorithm: .loha, layer: conv3d, options: options { $0.useTucker = true }),
        Case(label: "lokr conv3d tucker bypass", algorithm: .lokr, layer: .convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3, 3], padding: [1, 1, 1])),
             options: options { $0.rank = 1; $0.useTucker = true; $0.bypassMode = true }),
        Case(label: "ia3 conv3d input bypass", algorithm: .ia3, layer: conv3d, options: options { $0.trainOnInput = true; $0.bypassMode = true }),
        Case(label: "ia3 conv1d output", algorithm: .ia3, layer: conv1d, options: options { _ in }),
        Case(label: "diag-oft linear rescaled constraint", algorithm: .diagOFT, layer: linear,
             options: options { $0.rescaled = true; $0.constraint = 0.05 }, parameterStep: 1e-2),
        Case(label: "diag-oft conv bypass rescaled", algorithm: .diagOFT, layer: conv,
             options: options { $0.rescaled = true; $0.bypassMode = true }, parameterStep: 1e-2),
        Case(label: "diag-oft conv3d", algorithm: .diagOFT, layer: conv3d, options: options { $0.rank = 3 }, parameterStep: 1e-2),
        Case(label: "boft linear rescaled", algorithm: .boft, layer: boftLinear, options: options { $0.rescaled = true }, parameterStep: 1e-2),
        Case(label: "boft linear bypass constraint", algorithm: .boft, layer: boftLinear,
             options: options { $0.bypassMode = true; $0.constraint = 0.05 }, parameterStep: 1e-2),
        Case(label: "boft conv rescaled bypass", algorithm: .boft, layer: boftConv,
             options: options { $0.rank = 4; $0.rescaled = true; $0.bypassMode = true }, parameterStep: 1e-2),
        Case(label: "boft conv1d", algorithm: .boft, layer: .convolution(ConvGeometry(inChannels: 4, outChannels: 8, kernelSize: [3], padding: [1])),
             options: options { _ in }, parameterStep: 1e-2),
        Case(label: "tlora linear", algorithm: .tlora, layer: linear, options: options { $0.rank = 3 }),
        Case(label: "tlora conv 3x3 bypass masked", algorithm: .tlora, layer: conv, options: options { $0.rank = 3; $0.bypassMode = true },
             timestepMask: [1, 0, 1]),
        Case(label: "tlora conv1d last", algorithm: .tlora, layer: conv1d, options: options { $0.sigType = "last" }, timestepMask: [0.5]),
        Case(label: "norm layer_norm 2-D", algorithm: .norms, layer: .norm(Normalization(kind: .layer(normalizedShape: [3, 4]))),
             options: options { _ in }, inputShape: [2, 3, 4]),
        Case(label: "norm layer_norm no bias", algorithm: .norms, layer: .norm(Normalization(kind: .layer(normalizedShape: [6]), hasBias: false)),
             options: options { _ in }, inputShape: [4, 6]),
        Case(label: "norm group_norm", algorithm: .norms, layer: .norm(Normalization(kind: .group(groups: 2, channels: 6), eps: 1e-3)),
             options: options { _ in }, inputShape: [2, 6, 3, 2]),
        Case(label: "norm group_norm (N, C)", algorithm: .norms, layer: .norm(Normalization(kind: .group(groups: 3, channels: 12))),
             options: options { $0.bypassMode = true }, inputShape: [3, 12]),
        Case(label: "dora locon linear", algorithm: .locon, layer: linear, options: options { $0.weightDecompose = true }),
        Case(label: "dora locon conv input axis scalar", algorithm: .locon, layer: conv,
             options: options { $0.weightDecompose = true; $0.wdOnOutput = false; $0.useScalar = true }),
        Case(label: "dora loha conv tucker bypass", algorithm: .loha, layer: conv,
             options: options { $0.weightDecompose = true; $0.useTucker = true; $0.bypassMode = true }),
        Case(label: "dora lokr linear input axis", algorithm: .lokr, layer: linear,
             options: options { $0.rank = 1; $0.weightDecompose = true; $0.wdOnOutput = false }),
        Case(label: "dora lokr conv3d", algorithm: .lokr, layer: conv3d, options: options { $0.rank = 1; $0.weightDecompose = true }),
        Case(label: "glora linear scalar", algorithm: .glora, layer: linear, options: options { $0.useScalar = true }),
        Case(label: "glora conv", algorithm: .glora, layer: conv, options: options { _ in }),
        Case(label: "glora conv1d bypass", algorithm: .glora, layer: conv1d, options: options { $0.bypassMode = true }),
        Case(label: "glora conv3d", algorithm: .glora, layer: conv3d, options: options { _ in }),
        Case(label: "full linear", algorithm: .full, layer: linear, options: options { _ in }),
        Case(label: "full conv3d", algorithm: .full, layer: conv3d, options: options { _ in }),
    ]

    /// Linear (3, in); conv (2, C, spatial…) with spatial (7), (5, 4) or (3, 4, 3).
    static func inputShape(_ layer: LayerSpec) -> [Int] {
        guard layer.isConvolution else { return [3, layer.inputChannels] }
        return [2, layer.inputChannels] + [[7], [5, 4], [3, 4, 3]][layer.kernelSize.count - 1]
    }

    /// DyLoRA uses blocks 0…b−1 detached: their gradient is zero by definition, not the
    /// finite difference; only block b is compared.
    func detachedElements(_ module: AdapterModule, _ tape: AdapterModule.Tape, _ name: String, _ shape: [Int]) -> (Int) -> Bool {
        guard let dylora = module.algorithm as? DyLoRA, let block = tape.context.block else { return { _ in false } }
        let trained = (block * dylora.blockSize)..<((block + 1) * dylora.blockSize)
        if name == "lora_up.weight" { return { !trained.contains($0 % shape[1]) } }
        let width = shape[1...].reduce(1, *)
        return { !trained.contains($0 / width) }
    }

    @Test("∂x and every ∂parameter", arguments: cases)
    func gradients(_ testCase: Case) throws {
        var random = RandomSource(seed: 7)
        let layer = testCase.layer
        var baseRandom = RandomSource(seed: 8)
        let baseWeight = Tensor.normal(layer.weightShape, std: 0.5, using: &baseRandom)
        var adapter = try testCase.algorithm.makeAdapter(layer: layer, options: testCase.options, random: &random,
                                                         baseWeight: baseWeight, hasBias: true)
        for (name, tensor) in adapter.parameters.entries {
            adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random)
        }
        var module = AdapterModule(name: "m", algorithm: adapter, options: testCase.options, baseWeight: baseWeight,
                                   baseBias: .normal(layer.biasShape, std: 0.5, using: &random))
        module.multiplier = 0.8
        module.timestepMask = testCase.timestepMask.map { Tensor(shape: [$0.count], scalars: $0) }
        let inputShape = testCase.inputShape ?? Self.inputShape(layer)
        let x = Tensor.normal(inputShape, std: 1, using: &random)
        let tape = module.makeTape(inputShape: inputShape, random: &random)
        let g = Tensor.normal(layer.outputShape(forInput: inputShape), std: 1, using: &random)
        let loss = { (m: AdapterModule, input: Tensor) throws -> Double in
            let y = try m.forward(input, tape: tape)
            return zip(y.scalars, g.scalars).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        }
        let analytic = try module.backward(x, gradOutput: g, tape: tape)

        func checkDifference(_ label: String, count: Int, analytic: Tensor, step: Float = 0.25, detached: (Int) -> Bool = { _ in false },
                             perturbed: (Int, Float) throws -> Double) rethrows {
            var worst: Double = 0
            for i in 0..<count {
                if detached(i) {
                    #expect(analytic.scalars[i] == 0, "\(testCase.label) \(label)[\(i)]: a detached element has gradient")
                    continue
                }
                let numeric = (try perturbed(i, step) - perturbed(i, -step)) / Double(2 * step)
                worst = max(worst, abs(numeric - Double(analytic.scalars[i])))
            }
            let scale = max(Double(analytic.maxAbs), 1e-3)
            #expect(worst / scale < 2e-3, "\(testCase.label) \(label): finite-difference error \(worst / scale)")
        }

        try checkDifference("∂x", count: x.count, analytic: analytic.input, step: layer.normalization == nil ? 0.25 : 1e-2) { i, h in
            var shifted = x
            shifted.scalars[i] += h
            return try loss(module, shifted)
        }
        for (name, tensor) in module.algorithm.parameters.entries {
            let grad = try #require(analytic.parameters[name])
            let step = testCase.options.weightDecompose ? 1e-2 : testCase.parameterStep
            try checkDifference("∂\(name)", count: tensor.count, analytic: grad, step: step,
                                detached: detachedElements(module, tape, name, tensor.shape)) { i, h in
                var shifted = module
                var value = tensor
                value.scalars[i] += h
                shifted.algorithm.parameters[name] = value
                return try loss(shifted, x)
            }
        }
    }
}
