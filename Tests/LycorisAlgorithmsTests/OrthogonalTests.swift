import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// Diag-OFT and BOFT beyond the fixtures: the factorisations, what LyCORIS 4.1.3 cannot
/// compute (Diag-OFT with `rescaled` and a multiplier ≠ 1), and the rotation's defining
/// property.
@Suite("Diag-OFT and BOFT")
struct OrthogonalTests {
    static let linear = LayerSpec.linear(inFeatures: 10, outFeatures: 12)

    func module(_ algorithm: Algorithm, _ options: AdapterOptions, seed: UInt64 = 3, rescale: Tensor? = nil) throws -> AdapterModule {
        var random = RandomSource(seed: seed)
        var adapter = try algorithm.makeAdapter(layer: Self.linear, options: options, random: &random)
        adapter.parameters["oft_blocks"] = .normal(adapter.parameters["oft_blocks"]!.shape, std: 0.5, using: &random)
        if let rescale { adapter.parameters["rescale"] = rescale }
        return AdapterModule(name: "m", algorithm: adapter, options: options,
                             baseWeight: .normal(Self.linear.weightShape, std: 0.5, using: &random))
    }

    @Test("power2Factorization as LyCORIS: even blocks times a power of two, none for 20 with factor 4")
    func butterflyFactorization() {
        #expect(power2Factorization(16, factor: 4)! == (4, 4))
        #expect(power2Factorization(12, factor: 6)! == (6, 2))
        #expect(power2Factorization(64, factor: -1)! == (64, 1))
        #expect(power2Factorization(20, factor: 4) == nil)
        #expect(throws: AdapterError.self) {
            var random = RandomSource(seed: 0)
            _ = try Algorithm.boft.makeAdapter(layer: .linear(inFeatures: 4, outFeatures: 20), options: AdapterOptions(rank: 4, alpha: 1), random: &random)
        }
    }

    @Test("Diag-OFT rescaled with multiplier m: W' = rescale ⊙ (W0 + m·(Rᵀ − I)·W0) (LyCORIS 4.1.3 crashes here)")
    func rescaledMultiplier() throws {
        var plain = AdapterOptions(rank: 4, alpha: 1)
        plain.constraint = 0.02
        var rescaled = plain
        rescaled.rescaled = true
        var random = RandomSource(seed: 9)
        let rescale = Tensor.normal([12, 1], std: 0.5, using: &random)
        let unscaled = try module(.diagOFT, plain)
        var scaled = try module(.diagOFT, rescaled, rescale: rescale)
        let w0 = try #require(unscaled.baseWeight)
        let rotationPart = try unscaled.effectiveDeltaWeight(unscaled.makeTape(inputShape: [], random: &random))  // (Rᵀ − I)·W0
        for m: Float in [0.6, 1.5] {
            scaled.multiplier = m
            let rowScale = Tensor(shape: w0.shape, scalars: (0..<w0.count).map { rescale.scalars[$0 / 10] })
            let expected = (w0 + rotationPart * m) * rowScale - w0
            expectClose(try scaled.effectiveDeltaWeight(scaled.makeTape(inputShape: [], random: &random)), expected, "m \(m)")
        }
    }

    @Test("at m = 1 without rescale the transform is orthogonal: W' keeps W0's column norms", arguments: [Algorithm.diagOFT, .boft])
    func orthogonality(_ algorithm: Algorithm) throws {
        var options = AdapterOptions(rank: algorithm == .boft ? 6 : 4, alpha: 1)
        options.constraint = 0.01
        let m = try module(algorithm, options)
        var random = RandomSource(seed: 1)
        let w0 = try #require(m.baseWeight)
        let merged = w0 + (try m.effectiveDeltaWeight(m.makeTape(inputShape: [], random: &random)))
        #expect(relativeError(merged, w0) > 1e-2, "the rotation changes W0")
        for column in 0..<10 {
            let before = (0..<12).reduce(0.0) { $0 + Double(w0.scalars[$1 * 10 + column] * w0.scalars[$1 * 10 + column]) }
            let after = (0..<12).reduce(0.0) { $0 + Double(merged.scalars[$1 * 10 + column] * merged.scalars[$1 * 10 + column]) }
            #expect(abs(after - before) <= 1e-5 * before, "column \(column)")
        }
    }
}
