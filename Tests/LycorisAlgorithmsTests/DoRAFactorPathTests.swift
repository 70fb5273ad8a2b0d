import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// DoRA's factor path (the elementwise transfer with side output_with_input): y' from the base
/// output y0 = op(x, W0) + b and the chain on x. Checked against the rebuilt weight's
/// forward and backward (themselves checked against LyCORIS's fixtures and finite
/// differences) and against central finite differences of its own forward.
@Suite("DoRA factor path")
struct DoRAFactorPathTests {
    static let layers: [LayerSpec] = [
        .linear(inFeatures: 8, outFeatures: 6),
        .convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1])),
    ]

    /// A DoRA LoCon module on `layer` with random factors, magnitude, W0 and bias, and a
    /// multiplier that is not 1 (so c = m·(mag/n − 1) + 1 is exercised).
    static func module(_ layer: LayerSpec, algorithm: Algorithm = .locon,
                       options edit: (inout AdapterOptions) -> Void = { _ in }) throws -> AdapterModule {
        var options = AdapterOptions(rank: 2, alpha: 3)
        options.weightDecompose = true
        edit(&options)
        var random = RandomSource(seed: 11)
        let w0 = Tensor.normal(layer.weightShape, std: 0.5, using: &random)
        var adapter = try algorithm.makeAdapter(layer: layer, options: options, random: &random, baseWeight: w0, hasBias: true)
        for (name, tensor) in adapter.parameters.entries {
            adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random) + (name == "dora_scale" ? 1 : 0) * tensor
        }
        var module = AdapterModule(name: "m", algorithm: adapter, options: options, baseWeight: w0,
                                   baseBias: .normal(layer.biasShape, std: 0.5, using: &random))
        module.multiplier = 0.7
        module.isTraining = true
        return module
    }

    /// A module on `layer`, an input x, an upstream gradient g (y's shape) and a training tape.
    static func sample(_ layer: LayerSpec, seed: UInt64, algorithm: Algorithm = .locon,
                       scalar: Bool = false) throws -> (AdapterModule, Tensor, Tensor, AdapterModule.Tape) {
        let m = try module(layer, algorithm: algorithm) { $0.useScalar = scalar; if algorithm == .lokr { $0.rank = 1 } }
        var random = RandomSource(seed: seed)
        let x = Tensor.normal(layer.isConvolution ? [2, 4, 5, 4] : [3, 8], std: 1, using: &random)
        let g = Tensor.normal(layer.outputShape(forInput: x.shape), std: 1, using: &random)
        return (m, x, g, m.makeTape(inputShape: x.shape, random: &random))
    }

    static func baseOutput(_ module: AdapterModule, _ x: Tensor) -> Tensor {
        var y = module.layer.apply(x, weight: module.baseWeight!)
        module.layer.addBias(&y, bias: module.baseBias!)
        return y
    }

    @Test("has the transfer on the output axis without rank_dropout; the input axis keeps the rebuilt weight")
    func availability() throws {
        let layer = Self.layers[0]
        #expect(try Self.module(layer).elementwiseSide == .outputWithInput)
        #expect(try Self.module(layer) { $0.wdOnOutput = false }.elementwiseSide == nil)
        #expect(try Self.module(layer) { $0.rankDropout = 0.5 }.elementwiseSide == nil)
        let m = try Self.module(layer)
        var random = RandomSource(seed: 1)
        let tape = m.makeTape(inputShape: [3, 8], random: &random)
        #expect(throws: AdapterError.self) { try m.forwardElementwise(Tensor.zeros([3, 5]), layerInput: Tensor.zeros([3, 8]), tape: tape) }
        #expect(throws: AdapterError.self) { try m.forwardElementwise(Tensor.zeros([4, 6]), layerInput: Tensor.zeros([3, 8]), tape: tape) }
    }

    /// Without a scalar the norms come from W0·downᵀ (``LowRankRowNorms``); with one, from V.
    @Test("y', ∂x and every ∂parameter equal the rebuilt weight's (W' = c ⊙ V), multiplier 0.7, V formed or not",
          arguments: layers, [false, true])
    func matchesRebuild(_ layer: LayerSpec, scalar: Bool) throws {
        let (m, x, g, tape) = try Self.sample(layer, seed: 5, scalar: scalar)
        try expectMatchesRebuild(m, x, g, tape)
    }

    func expectMatchesRebuild(_ m: AdapterModule, _ x: Tensor, _ g: Tensor, _ tape: AdapterModule.Tape) throws {
        #expect(!tape.bypass && !tape.skipped)
        let y0 = Self.baseOutput(m, x)
        let (y, saved) = try m.forwardElementwise(y0, layerInput: x, tape: tape)
        expectClose(y, try m.forward(x, tape: tape), tolerance: 1e-5, "y'")
        let factor = try m.backwardElementwise(saved: saved, layerInput: x, gradOutput: g, tape: tape)
        let rebuild = try m.backward(x, gradOutput: g, tape: tape)
        // ∂x of the whole layer: the base layer's part through ∂y0, plus the chain's.
        expectClose(m.layer.backwardInput(factor.input, weight: m.baseWeight!, input: x) + factor.layerInput, rebuild.input,
                    tolerance: 1e-5, "∂x")
        for (name, expected) in rebuild.parameters.entries {
            expectClose(try #require(factor.parameters[name]), expected, tolerance: 1e-4, "∂\(name)")
        }
    }

    @Test("∂y0, ∂x and every ∂parameter against central finite differences, V formed or not", arguments: layers, [false, true])
    func finiteDifferences(_ layer: LayerSpec, scalar: Bool) throws {
        let (m, x, g, tape) = try Self.sample(layer, seed: 6, scalar: scalar)
        var random = RandomSource(seed: 7)
        let y0 = Tensor.normal(g.shape, std: 1, using: &random)
        let loss = { (module: AdapterModule, y0: Tensor, x: Tensor) throws -> Double in
            let y = try module.forwardElementwise(y0, layerInput: x, tape: tape).output
            return zip(y.scalars, g.scalars).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        }
        let saved = try m.forwardElementwise(y0, layerInput: x, tape: tape).saved
        let analytic = try m.backwardElementwise(saved: saved, layerInput: x, gradOutput: g, tape: tape)

        /// Worst |numeric − analytic| relative to max |analytic|; y' is linear in y0 and x
        /// (a large step is exact up to rounding), not in the parameters (a small one).
        func worst(_ gradient: Tensor, step: Float, _ perturbed: (Int, Float) throws -> Double) rethrows -> Double {
            var worst = 0.0
            for i in 0..<gradient.count {
                let numeric = (try perturbed(i, step) - perturbed(i, -step)) / Double(2 * step)
                worst = max(worst, abs(numeric - Double(gradient.scalars[i])))
            }
            return worst / max(Double(gradient.maxAbs), 1e-3)
        }
        let errorY0 = try worst(analytic.input, step: 0.25) { i, h in
            var t = y0
            t.scalars[i] += h
            return try loss(m, t, x)
        }
        #expect(errorY0 < 2e-3, "∂y0: \(errorY0)")
        let errorX = try worst(analytic.layerInput, step: 0.25) { i, h in
            var t = x
            t.scalars[i] += h
            return try loss(m, y0, t)
        }
        #expect(errorX < 2e-3, "∂x: \(errorX)")
        for (name, tensor) in m.algorithm.parameters.entries {
            let error = try worst(try #require(analytic.parameters[name]), step: 1e-2) { i, h in
                var shifted = m
                var value = tensor
                value.scalars[i] += h
                shifted.algorithm.parameters[name] = value
                return try loss(shifted, y0, x)
            }
            #expect(error < 2e-3, "∂\(name): \(error)")
        }
    }

    @Test("LoHa and LoKr bases (V formed): y', ∂x and every ∂parameter equal the rebuilt weight's",
          arguments: [Algorithm.loha, .lokr], layers)
    func otherBases(_ algorithm: Algorithm, _ layer: LayerSpec) throws {
        let (m, x, g, tape) = try Self.sample(layer, seed: 8, algorithm: algorithm)
        #expect(m.elementwiseSide == .outputWithInput)
        try expectMatchesRebuild(m, x, g, tape)
    }

    @Test("module_dropout's skipped step passes y0 through: ∂y0 = ∂y', ∂x and ∂parameters zero")
    func skipped() throws {
        var m = try Self.module(Self.layers[0])
        m.options.moduleDropout = 0.999_999
        var random = RandomSource(seed: 2)
        let tape = m.makeTape(inputShape: [3, 8], random: &random)
        #expect(tape.skipped)
        let x = Tensor.normal([3, 8], std: 1, using: &random), y0 = Tensor.normal([3, 6], std: 1, using: &random)
        let (y, saved) = try m.forwardElementwise(y0, layerInput: x, tape: tape)
        #expect(y == y0)
        let grads = try m.backwardElementwise(saved: saved, layerInput: x, gradOutput: y0, tape: tape)
        #expect(grads.input == y0 && grads.layerInput.maxAbs == 0)
        #expect(grads.parameters.entries.allSatisfy { $0.tensor.maxAbs == 0 })
    }
}
