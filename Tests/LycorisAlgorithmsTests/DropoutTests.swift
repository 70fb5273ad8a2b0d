import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// dropout, rank_dropout and module_dropout: active only in training, seeded, with the
/// masks LyCORIS defines (kept with probability 1−p; rank_dropout_scale divides by the
/// mask mean), and the backward pass uses the forward's masks.
@Suite("Dropouts")
struct DropoutTests {
    static let layer = LayerSpec.linear(inFeatures: 32, outFeatures: 48)

    func module(_ edit: (inout AdapterOptions) -> Void, algorithm: Algorithm = .locon, layer: LayerSpec = DropoutTests.layer,
                training: Bool = true) throws -> AdapterModule {
        var options = AdapterOptions(rank: 16, alpha: 8)
        edit(&options)
        var random = RandomSource(seed: 21)
        var adapter = try algorithm.makeAdapter(layer: layer, options: options, random: &random)
        for (name, tensor) in adapter.parameters.entries { adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random) }
        var module = AdapterModule(name: "m", algorithm: adapter, options: options,
                                   baseWeight: .normal(layer.weightShape, std: 0.5, using: &random))
        module.isTraining = training
        return module
    }

    @Test("eval mode ignores every dropout")
    func evalIsDeterministic() throws {
        let dropped = try module({ $0.dropout = 0.5; $0.rankDropout = 0.5; $0.moduleDropout = 0.5; $0.bypassMode = true }, training: false)
        let plain = try module({ $0.bypassMode = true }, training: false)
        var random = RandomSource(seed: 1)
        let x = Tensor.normal([4, 32], std: 1, using: &random)
        let tape = dropped.makeTape(inputShape: x.shape, random: &random)
        #expect(!tape.skipped && tape.rowMask == nil && tape.context.rankMask == nil && tape.outputMask == nil)
        #expect(try dropped.forwardDelta(x, tape: tape) == plain.forwardDelta(x, tape: plain.makeTape(inputShape: x.shape, random: &random)))
    }

    @Test("module_dropout skips the adapter with probability p")
    func moduleDropout() throws {
        let m = try module { $0.moduleDropout = 0.3 }
        var random = RandomSource(seed: 2)
        let trials = 4000
        let skipped = (0..<trials).filter { _ in m.makeTape(inputShape: [1, 32], random: &random).skipped }.count
        // Binomial(4000, 0.3): σ ≈ 29; allow 5σ.
        #expect(abs(skipped - 1200) < 145, "skipped \(skipped) of \(trials)")
        var tape = m.makeTape(inputShape: [1, 32], random: &random)
        tape.skipped = true
        let x = Tensor(repeating: 1, shape: [1, 32])
        #expect(try m.forwardDelta(x, tape: tape) == .zeros([1, 48]))
        let grads = try m.backwardDelta(x, gradOutput: Tensor(repeating: 1, shape: [1, 48]), tape: tape)
        #expect(grads.parameters.entries.allSatisfy { $0.tensor.maxAbs == 0 })
    }

    @Test("rank_dropout masks ΔW rows in rebuild mode", arguments: [Algorithm.locon, .loha, .lokr, .glora, .full])
    func rankDropoutRows(_ algorithm: Algorithm) throws {
        let m = try module({ $0.rankDropout = 0.25; $0.rank = 4 }, algorithm: algorithm)
        var random = RandomSource(seed: 3)
        let tape = m.makeTape(inputShape: [2, 32], random: &random)
        let mask = try #require(tape.rowMask)
        #expect(mask.shape == [48] && mask.scalars.allSatisfy { $0 == 0 || $0 == 1 })
        var eval = m
        eval.isTraining = false
        let full = try eval.effectiveDeltaWeight(eval.makeTape(inputShape: [], random: &random))
        let dropped = try m.effectiveDeltaWeight(tape)
        for row in 0..<48 {
            let expected = full.slice(axis: 0, row..<(row + 1)) * mask.scalars[row]
            #expect(dropped.slice(axis: 0, row..<(row + 1)) == expected)
        }
    }

    @Test("norm rank_dropout drops each element of w_norm and b_norm with probability p, one mask for both")
    func normRankDropout() throws {
        // LyCORIS 4.1.3's NormModule keeps an element when rand < p (it keeps a fraction p);
        // here each element is dropped with probability p, as the option means everywhere else.
        let layer = LayerSpec.norm(Normalization(kind: .group(groups: 4, channels: 64)))
        var options = AdapterOptions()
        options.rankDropout = 0.25
        var random = RandomSource(seed: 8)
        var adapter = try Algorithm.norms.makeAdapter(layer: layer, options: options, random: &random)
        for (name, tensor) in adapter.parameters.entries { adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random) }
        var m = AdapterModule(name: "n", algorithm: adapter, options: options)
        m.isTraining = true
        m.multiplier = 0.5
        var dropped = 0
        for _ in 0..<100 {
            let tape = m.makeTape(inputShape: [2, 64, 3], random: &random)
            let mask = try #require(tape.rowMask)
            #expect(mask.shape == [64] && mask.scalars.allSatisfy { $0 == 0 || $0 == 1 })
            dropped += mask.scalars.filter { $0 == 0 }.count
            expectClose(try m.effectiveDeltaWeight(tape), adapter.parameters.required("w_norm") * mask * 0.5, "masked m·ΔW")
            expectClose(try #require(try m.effectiveDeltaBias(tape)), adapter.parameters.required("b_norm") * mask * 0.5, "masked m·Δb")
        }
        // Binomial(6400, 0.25): σ ≈ 35; allow 5σ.
        #expect(abs(dropped - 1600) < 175, "dropped \(dropped) of 6400")
    }

    @Test("rank_dropout_scale divides the mask by its mean")
    func rankDropoutScale() throws {
        let m = try module { $0.rankDropout = 0.5; $0.rankDropoutScale = true }
        var random = RandomSource(seed: 4)
        let mask = try #require(m.makeTape(inputShape: [2, 32], random: &random).rowMask)
        #expect(abs(mask.sum / Float(mask.count) - 1) < 1e-5)
    }

    @Test("LoCon bypass rank_dropout masks the rank axis, and backward uses the same mask")
    func loconBypassRankAxis() throws {
        let m = try module { $0.rankDropout = 0.5; $0.bypassMode = true }
        var random = RandomSource(seed: 5)
        let x = Tensor.normal([3, 32], std: 1, using: &random)
        let tape = m.makeTape(inputShape: x.shape, random: &random)
        #expect(tape.bypass)
        let mask = try #require(tape.context.rankMask)
        #expect(mask.shape == [16])
        // Oracle: up · diag(mask) · down as an explicit weight.
        let up = m.algorithm.parameters.required("lora_up.weight"), down = m.algorithm.parameters.required("lora_down.weight")
        let maskedDown = Tensor(shape: down.shape, scalars: down.scalars.enumerated().map { $0.element * mask.scalars[$0.offset / 32] })
        let weight = Tensor.matmul(up, maskedDown) * m.algorithm.scale
        expectClose(try m.forwardDelta(x, tape: tape), Self.layer.apply(x, weight: weight), "masked bypass")
        let g = Tensor.normal([3, 48], std: 1, using: &random)
        let grads = try m.backwardDelta(x, gradOutput: g, tape: tape)
        expectClose(grads.input, Self.layer.backwardInput(g, weight: weight, inputShape: x.shape), "masked bypass ∂x")
    }

    /// LyCORIS 4.1.3 fails here (its mask is shaped for 4-D activations only); the mask
    /// belongs on the rank axis, as on conv2d.
    @Test("LoCon bypass rank_dropout masks the rank axis on conv1d and conv3d", arguments: [
        ConvGeometry(inChannels: 6, outChannels: 8, kernelSize: [3], stride: [2], padding: [1]),
        ConvGeometry(inChannels: 6, outChannels: 8, kernelSize: [3, 1, 3], padding: [1, 0, 1]),
    ])
    func loconConvBypassRankAxis(_ geometry: ConvGeometry) throws {
        let layer = LayerSpec.convolution(geometry)
        let m = try module({ $0.rankDropout = 0.5; $0.rank = 4; $0.bypassMode = true }, layer: layer)
        var random = RandomSource(seed: 8)
        let x = Tensor.normal([2, 6] + geometry.kernelSize.map { _ in 5 }, std: 1, using: &random)
        let tape = m.makeTape(inputShape: x.shape, random: &random)
        #expect(tape.bypass)
        let mask = try #require(tape.context.rankMask)
        #expect(mask.shape == [4])
        // Oracle: ΔW = up · diag(mask) · down, applied as the layer's op.
        let up = m.algorithm.parameters.required("lora_up.weight"), down = m.algorithm.parameters.required("lora_down.weight")
        let rowLength = down.count / 4
        let maskedDown = Tensor(shape: down.shape, scalars: down.scalars.enumerated().map { $0.element * mask.scalars[$0.offset / rowLength] })
        let weight = (Tensor.matmul(up.reshaped([8, 4]), maskedDown.reshaped([4, rowLength])) * m.algorithm.scale).reshaped(layer.weightShape)
        expectClose(try m.forwardDelta(x, tape: tape), layer.apply(x, weight: weight), "masked \(geometry.kind) bypass")
        let g = Tensor.normal(layer.outputShape(forInput: x.shape), std: 1, using: &random)
        let grads = try m.backwardDelta(x, gradOutput: g, tape: tape)
        expectClose(grads.input, layer.backwardInput(g, weight: weight, inputShape: x.shape), "masked \(geometry.kind) bypass ∂x")
    }

    @Test("dropout (bypass) zeroes outputs with probability p and rescales the rest by 1/(1−p)")
    func outputDropout() throws {
        let m = try module { $0.dropout = 0.4; $0.bypassMode = true }
        var random = RandomSource(seed: 6)
        let x = Tensor.normal([50, 32], std: 1, using: &random)
        let tape = m.makeTape(inputShape: x.shape, random: &random)
        let mask = try #require(tape.outputMask)
        let zeros = mask.scalars.filter { $0 == 0 }.count
        // Binomial(2400, 0.4): σ = 24; allow 5σ.
        #expect(abs(zeros - 960) < 120, "dropped \(zeros) of 2400")
        #expect(mask.scalars.allSatisfy { $0 == 0 || abs($0 - 1 / 0.6) < 1e-6 })
        var plain = m
        plain.options.dropout = 0
        let undropped = try plain.forwardDelta(x, tape: plain.makeTape(inputShape: x.shape, random: &random))
        #expect(try m.forwardDelta(x, tape: tape) == undropped * mask)
    }

    @Test("same seed, same masks")
    func seeded() throws {
        let m = try module { $0.rankDropout = 0.5; $0.moduleDropout = 0.2 }
        var a = RandomSource(seed: 9), b = RandomSource(seed: 9)
        for _ in 0..<20 {
            let ta = m.makeTape(inputShape: [1, 32], random: &a), tb = m.makeTape(inputShape: [1, 32], random: &b)
            #expect(ta.skipped == tb.skipped && ta.rowMask == tb.rowMask)
        }
    }

    @Test("DyLoRA draws its block uniformly in training and uses every block in eval")
    func dyloraBlocks() throws {
        let m = try module({ $0.rank = 8; $0.blockSize = 2 }, algorithm: .dylora)
        var random = RandomSource(seed: 7)
        var counts = [Int](repeating: 0, count: 4)
        for _ in 0..<4000 { counts[m.makeTape(inputShape: [1, 32], random: &random).context.block!] += 1 }
        // Each block ~1000 (σ ≈ 27).
        #expect(counts.allSatisfy { abs($0 - 1000) < 140 }, "\(counts)")
        var eval = m
        eval.isTraining = false
        #expect(eval.makeTape(inputShape: [1, 32], random: &random).context.block == 3)
    }
}
