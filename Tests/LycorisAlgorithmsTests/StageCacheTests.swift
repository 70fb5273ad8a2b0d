import LycorisAlgorithms
import LycorisCore
import Testing

/// The bypass forward keeps its chain's stage inputs on the tape for the backward
/// (``StageCache``): the backward after a forward on the same x equals a backward on a tape
/// that never ran a forward, and a different x or changed factors are not served stale
/// stage inputs.
@Suite("Stage cache")
struct StageCacheTests {
    static let cases: [(String, Algorithm, LayerSpec, AdapterOptions)] = {
        func options(_ edit: (inout AdapterOptions) -> Void) -> AdapterOptions {
            var options = AdapterOptions(rank: 4, alpha: 3)
            options.bypassMode = true
            edit(&options)
            return options
        }
        let conv = LayerSpec.convolution(ConvGeometry(inChannels: 6, outChannels: 5, kernelSize: [3, 3], padding: [1, 1]))
        let linear = LayerSpec.linear(inFeatures: 12, outFeatures: 10)
        return [
            ("locon conv", .locon, conv, options { _ in }),
            ("locon conv tucker", .locon, conv, options { $0.useTucker = true }),
            ("loha linear", .loha, linear, options { $0.rank = 2 }),
            ("dylora linear", .dylora, linear, options { $0.blockSize = 2 }),
            ("lokr conv", .lokr, LayerSpec.convolution(ConvGeometry(inChannels: 6, outChannels: 4, kernelSize: [3, 3], padding: [1, 1])),
             options { $0.factor = 2 }),
            ("lokr conv low-rank w2 decompose_both", .lokr,
             LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1])),
             options { $0.rank = 1; $0.decomposeBoth = true }),
        ]
    }()

    /// A module with random parameters (up factors are zero at init), training mode.
    static func module(_ algorithm: Algorithm, _ layer: LayerSpec, _ options: AdapterOptions) throws -> AdapterModule {
        var random = RandomSource(seed: 3)
        var adapter = try algorithm.makeAdapter(layer: layer, options: options, random: &random)
        for (name, tensor) in adapter.parameters.entries {
            adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random)
        }
        var module = AdapterModule(name: "m", algorithm: adapter, options: options)
        module.isTraining = true
        module.multiplier = 0.7
        return module
    }

    static func input(_ layer: LayerSpec, seed: UInt64) -> Tensor {
        var random = RandomSource(seed: seed)
        return Tensor.normal(layer.isConvolution ? [2, layer.inputChannels, 5, 4] : [3, layer.inputChannels], std: 1, using: &random)
    }

    /// The tape's random choices with an empty cache.
    static func fresh(_ tape: AdapterModule.Tape) -> AdapterModule.Tape {
        var copy = tape
        let c = tape.context
        copy.context = DeltaContext(baseWeight: c.baseWeight, baseBias: c.baseBias, block: c.block, rankMask: c.rankMask,
                                    timestepMask: c.timestepMask)
        return copy
    }

    @Test(arguments: cases)
    func backwardAfterForwardEqualsRecomputed(_ label: String, _ algorithm: Algorithm, _ layer: LayerSpec, _ options: AdapterOptions) throws {
        let module = try Self.module(algorithm, layer, options)
        let (x, other) = (Self.input(layer, seed: 5), Self.input(layer, seed: 6))
        var random = RandomSource(seed: 9)
        let tape = module.makeTape(inputShape: x.shape, random: &random)
        #expect(tape.bypass, "\(label) takes its factor path")
        let g = Tensor.normal(layer.outputShape(forInput: x.shape), std: 1, using: &random)
        let expected = try module.backwardDelta(x, gradOutput: g, tape: Self.fresh(tape))
        let expectedOther = try module.backwardDelta(other, gradOutput: g, tape: Self.fresh(tape))
        #expect(expected.parameters != expectedOther.parameters)

        _ = try module.forwardDelta(x, tape: tape)
        let cached = try module.backwardDelta(x, gradOutput: g, tape: tape)
        #expect(cached.input == expected.input && cached.parameters == expected.parameters, "\(label): same x")
        let switched = try module.backwardDelta(other, gradOutput: g, tape: tape)
        #expect(switched.input == expectedOther.input && switched.parameters == expectedOther.parameters, "\(label): other x")

        // Factors changed after the forward: the stage inputs are computed again.
        _ = try module.forwardDelta(x, tape: tape)
        var changed = module
        for (name, tensor) in changed.algorithm.parameters.entries { changed.algorithm.parameters[name] = tensor * 1.5 }
        let recomputed = try changed.backwardDelta(x, gradOutput: g, tape: Self.fresh(tape))
        let afterChange = try changed.backwardDelta(x, gradOutput: g, tape: tape)
        #expect(afterChange.input == recomputed.input && afterChange.parameters == recomputed.parameters, "\(label): changed factors")
    }

    @Test func theForwardFillsTheCache() throws {
        let (_, algorithm, layer, options) = Self.cases[0]
        let module = try Self.module(algorithm, layer, options)
        let x = Self.input(layer, seed: 5)
        var random = RandomSource(seed: 9)
        let tape = module.makeTape(inputShape: x.shape, random: &random)
        let down = module.algorithm.parameters["lora_down.weight"]!
        #expect(tape.context.stageCache.stageInputs(for: [x, down]) == nil)
        _ = try module.forwardDelta(x, tape: tape)
        let inputs = try #require(tape.context.stageCache.stageInputs(for: [x, down]))
        #expect(inputs.count == 2 && inputs[0] == x)
        // The down stage (a 3×3 conv on DirectConvolution) keeps x padded for its ∂W; the
        // pointwise up stage keeps none.
        let stored = try #require(tape.context.stageCache.tape(for: [x, down]))
        #expect(stored.padded.count == 2 && stored.padded[0]?.inputShape == x.shape && stored.padded[1] == nil)
        #expect(tape.context.stageCache.stageInputs(for: [x, down * 2]) == nil)
    }
}
