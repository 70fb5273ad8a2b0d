import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// IA3's elementwise transfer against its Δ(x) path (itself checked against LyCORIS's
/// fixtures): on output, forwardElementwise(y) − y = m·Δ(x) with y = op(x, W0) + b, and the
/// parameter gradients agree; on input, op(forwardElementwise(x), W0) − op(x, W0) = m·Δ(x),
/// and ∂x chains through the base layer.
@Suite("Elementwise transfer")
struct ElementwiseTransferTests {
    static let layers: [LayerSpec] = [
        .linear(inFeatures: 6, outFeatures: 5),
        .convolution(ConvGeometry(inChannels: 3, outChannels: 4, kernelSize: [3, 3], padding: [1, 1])),
    ]

    func module(_ layer: LayerSpec, onInput: Bool, bypass: Bool?) throws -> AdapterModule {
        var options = AdapterOptions(rank: 4, alpha: 1)
        options.trainOnInput = onInput
        options.bypassMode = bypass
        var random = RandomSource(seed: 5)
        var adapter = try Algorithm.ia3.makeAdapter(layer: layer, options: options, random: &random)
        adapter.parameters["weight"] = .normal(adapter.parameters.required("weight").shape, std: 0.5, using: &random)
        var module = AdapterModule(name: "m", algorithm: adapter, options: options,
                                   baseWeight: .normal(layer.weightShape, std: 0.5, using: &random),
                                   baseBias: .normal([layer.outFeatures], std: 0.5, using: &random))
        module.multiplier = 0.7
        module.isTraining = true
        return module
    }

    func input(_ layer: LayerSpec) -> Tensor {
        randomTensor(layer.isConvolution ? [2, 3, 5, 5] : [2, 3, 6], seed: 9)
    }

    func baseOutput(_ module: AdapterModule, _ x: Tensor) -> Tensor {
        var y = module.layer.apply(x, weight: module.baseWeight!)
        module.layer.addBias(&y, bias: module.baseBias!)
        return y
    }

    @Test("on output, in rebuild and bypass mode: y' − y = m·Δ(x), same parameter gradients", arguments: [false, true])
    func outputSide(bypass: Bool) throws {
        for layer in Self.layers {
            let m = try module(layer, onInput: false, bypass: bypass)
            #expect(m.elementwiseSide == .output)
            let x = input(layer)
            let y = baseOutput(m, x)
            var random = RandomSource(seed: 1)
            let tape = m.makeTape(inputShape: x.shape, random: &random)
            #expect(tape.bypass == bypass)
            expectClose(try m.forwardElementwise(y, tape: tape) - y, try m.forwardDelta(x, tape: tape), tolerance: 1e-5, "\(layer.kind) y' − y")
            let g = randomTensor(y.shape, seed: 3)
            let elementwise = try m.backwardElementwise(y, gradOutput: g, tape: tape)
            let delta = try m.backwardDelta(x, gradOutput: g, tape: tape)
            expectClose(elementwise.parameters.required("weight"), delta.parameters.required("weight"), tolerance: 1e-4, "\(layer.kind) ∂w")
            // ∂y = g ⊙ (1 + m·w): through the base layer it is ∂x of the whole adapted layer.
            let gradX = m.layer.backwardInput(elementwise.input, weight: m.baseWeight!, inputShape: x.shape)
            let plainX = m.layer.backwardInput(g, weight: m.baseWeight!, inputShape: x.shape)
            expectClose(gradX, plainX + delta.input, tolerance: 1e-4, "\(layer.kind) ∂x")
        }
    }

    @Test("on input: op(x', W0) − op(x, W0) = m·Δ(x), same parameter gradients")
    func inputSide() throws {
        for layer in Self.layers {
            let m = try module(layer, onInput: true, bypass: nil)
            #expect(m.elementwiseSide == .input)
            let x = input(layer)
            var random = RandomSource(seed: 1)
            let tape = m.makeTape(inputShape: x.shape, random: &random)
            let scaled = try m.forwardElementwise(x, tape: tape)
            expectClose(m.layer.apply(scaled, weight: m.baseWeight!) - m.layer.apply(x, weight: m.baseWeight!),
                        try m.forwardDelta(x, tape: tape), tolerance: 1e-4, "\(layer.kind) Δ")
            let g = randomTensor(m.layer.outputShape(forInput: x.shape), seed: 3)
            let gradScaled = m.layer.backwardInput(g, weight: m.baseWeight!, inputShape: x.shape)
            let elementwise = try m.backwardElementwise(x, gradOutput: gradScaled, tape: tape)
            let delta = try m.backwardDelta(x, gradOutput: g, tape: tape)
            expectClose(elementwise.parameters.required("weight"), delta.parameters.required("weight"), tolerance: 1e-4, "\(layer.kind) ∂w")
            expectClose(elementwise.input, gradScaled + delta.input, tolerance: 1e-4, "\(layer.kind) ∂x")
        }
    }

    @Test("only IA3 without dropout and rank_dropout has one; a shape off the side is refused")
    func availability() throws {
        let layer = Self.layers[0]
        #expect(try module(layer, onInput: false, bypass: nil).elementwiseSide == .output)
        var options = AdapterOptions(rank: 4, alpha: 1)
        options.rankDropout = 0.5
        var random = RandomSource(seed: 2)
        let ia3 = try Algorithm.ia3.makeAdapter(layer: layer, options: options, random: &random)
        #expect(AdapterModule(name: "d", algorithm: ia3, options: options).elementwiseSide == nil)
        let lora = try Algorithm.locon.makeAdapter(layer: layer, options: AdapterOptions(rank: 2, alpha: 1), random: &random)
        #expect(AdapterModule(name: "l", algorithm: lora, options: AdapterOptions(rank: 2, alpha: 1)).elementwiseSide == nil)
        let m = try module(layer, onInput: false, bypass: nil)
        #expect(m.elementwiseProblem([2, 6]) != nil)  // the input's 6 features, not the output's 5
        #expect(m.elementwiseProblem([2, 3, 5]) == nil)
        #expect(throws: AdapterError.self) { try m.forwardElementwise(Tensor.zeros([2, 6]), tape: m.makeTape(inputShape: [2, 6], random: &random)) }
    }
}
