import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// DoRA's initialisation and multiplier rule, from its definition (the values against
/// LyCORIS are in the parity fixtures, the gradients in the finite-difference tests).
@Suite("DoRA")
struct DoRATests {
    static let conv = LayerSpec.convolution(ConvGeometry(inChannels: 3, outChannels: 4, kernelSize: [2, 2]))

    func module(onOutput: Bool, multiplier: Float = 1) throws -> AdapterModule {
        var options = AdapterOptions(rank: 2, alpha: 1)
        options.weightDecompose = true
        options.wdOnOutput = onOutput
        var random = RandomSource(seed: 4)
        let w0 = Tensor.normal(Self.conv.weightShape, std: 1, using: &random)
        let adapter = try Algorithm.locon.makeAdapter(layer: Self.conv, options: options, random: &random, baseWeight: w0)
        var module = AdapterModule(name: "m", algorithm: adapter, options: options, baseWeight: w0)
        module.multiplier = multiplier
        return module
    }

    @Test("dora_scale starts at the norms of W0: per output row (out, 1, 1, 1) or per input channel (1, in, 1, 1)",
          arguments: [true, false])
    func initialMagnitude(_ onOutput: Bool) throws {
        let m = try module(onOutput: onOutput)
        let magnitude = try #require(m.algorithm.parameters["dora_scale"])
        let w0 = m.baseWeight!
        #expect(magnitude.shape == (onOutput ? [4, 1, 1, 1] : [1, 3, 1, 1]))
        for g in 0..<(onOutput ? 4 : 3) {
            let slice = onOutput ? w0.slice(axis: 0, g..<(g + 1)) : w0.slice(axis: 1, g..<(g + 1))
            #expect(abs(magnitude.scalars[g] - slice.norm) <= 1e-5 * slice.norm)
        }
        // ΔW = 0 at init (LoCon's up factor is 0): W' = W0, so the module changes nothing.
        expectClose(try m.mergedWeight(), w0, "W'(1) at init")
    }

    @Test("multiplier 0 gives V = W0 + ΔW, not W0; multiplier 1 gives V scaled to the magnitude")
    func multiplierRule() throws {
        var m = try module(onOutput: true)
        var random = RandomSource(seed: 9)
        for (name, tensor) in m.algorithm.parameters.entries where name != "dora_scale" {
            m.algorithm.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random)
        }
        let w0 = m.baseWeight!
        let v = w0 + (try (m.algorithm as! DoRA<LoCon>).base.deltaWeight(DeltaContext()))
        m.multiplier = 0
        expectClose(try m.mergedWeight(), v, "W'(0)")
        m.multiplier = 1
        let merged = try m.mergedWeight()
        let magnitude = m.algorithm.parameters["dora_scale"]!
        for row in 0..<4 {
            #expect(abs(merged.slice(axis: 0, row..<(row + 1)).norm - magnitude.scalars[row]) <= 1e-5 * magnitude.scalars[row])
        }
    }
}
