import LycorisCheckpoints
import LycorisCore
import LycorisTestSupport
import Testing

/// LyCORIS's rank rules and the per-layer extraction on matrices of known spectrum.
@Suite("low-rank extraction")
struct LowRankExtractionTests {
    let s: [Float] = [8, 4, 2, 1, 0.5, 0.25]

    @Test("each mode's rank before the clamps")
    func rawRanks() {
        #expect(LowRankExtraction.rawRank(mode: .fixed, parameter: 3, singularValues: s) == 3)
        #expect(LowRankExtraction.rawRank(mode: .threshold, parameter: 1, singularValues: s) == 3, "S > 1")
        #expect(LowRankExtraction.rawRank(mode: .ratio, parameter: 0.2, singularValues: s) == 3, "S > 1.6")
        // cumsum 8, 12, 14, 15, 15.5, 15.75 of 15.75; below 0.9·15.75 = 14.175: 3 entries.
        #expect(LowRankExtraction.rawRank(mode: .quantile, parameter: 0.9, singularValues: s) == 3)
        #expect(LowRankExtraction.rawRank(mode: .quantile, parameter: 0, singularValues: s) == 0)
    }

    @Test("numpy's linear quantile")
    func quantile() {
        #expect(LowRankExtraction.quantile([4, 1, 3, 2], 0.5) == 2.5)
        #expect(LowRankExtraction.quantile([4, 1, 3, 2], 1) == 4)
        #expect(abs(LowRankExtraction.quantile([0, 10], 0.98) - 9.8) < 1e-6)
    }

    /// A (12, 10) ΔW = Σ_i s_i·u_i·v_iᵀ with the spectrum above (orthonormal u, v from an SVD).
    func matrix() throws -> Tensor {
        let basis = try randomTensor([12, 10], seed: 5).singularValueDecomposition()
        var scaled = basis.u
        for row in 0..<12 { for column in 0..<6 { scaled.scalars[row * 10 + column] *= s[column] } }
        for row in 0..<12 { for column in 6..<10 { scaled.scalars[row * 10 + column] = 0 } }
        return Tensor.matmul(scaled, basis.vt)
    }

    @Test("a rank below out/2 is factored with alpha = r; the error is the dropped tail")
    func lowRank() throws {
        let delta = try matrix()
        var options = LowRankExtraction.Options(mode: .threshold, linearParameter: 1, convParameter: 1)
        options.exact = true
        let result = try LowRankExtraction.extract(delta: delta, biasDelta: nil, options: options)
        #expect(result.kind == .lowRank && result.rank == 3)
        let tensors = Dictionary(uniqueKeysWithValues: result.tensors.map { ($0.suffix, $0.tensor) })
        #expect(tensors["lora_down.weight"]?.shape == [3, 10] && tensors["lora_up.weight"]?.shape == [12, 3])
        #expect(tensors["alpha"]?.scalars == [3])
        let tail = (s[3...].reduce(0) { $0 + $1 * $1 }).squareRoot() / (s.reduce(0) { $0 + $1 * $1 }).squareRoot()
        #expect(abs(result.relativeError - tail) < 1e-4)
    }

    @Test("from r >= out/2 the whole ΔW and Δb are kept")
    func fallBack() throws {
        let delta = try matrix()
        let bias = Tensor(shape: [12], scalars: (0..<12).map(Float.init))
        let result = try LowRankExtraction.extract(delta: delta, biasDelta: bias,
                                                   options: .init(mode: .fixed, linearParameter: 6, convParameter: 6))
        #expect(result.kind == .full && result.tensors.map(\.suffix) == ["diff", "diff_b"])
        #expect(result.tensors[0].tensor == delta && result.tensors[1].tensor == bias)
    }

    @Test("a 3×3 conv: Tucker core, 1×1 down, and up·mid·down has the error reported")
    func tucker() throws {
        // A 3×3 kernel: the matrix spread over the taps, (12, 10·9) of rank 6.
        let wide = Tensor.matmul(try matrix(), randomTensor([10, 90], seed: 9)).reshaped([12, 10, 3, 3])
        var options = LowRankExtraction.Options(mode: .fixed, linearParameter: 1, convParameter: 2)
        options.exact = true
        let result = try LowRankExtraction.extract(delta: wide, biasDelta: nil, options: options)
        let tensors = Dictionary(uniqueKeysWithValues: result.tensors.map { ($0.suffix, $0.tensor) })
        #expect(tensors["lora_mid.weight"]?.shape == [2, 2, 3, 3] && tensors["lora_down.weight"]?.shape == [2, 10, 1, 1])
        #expect(tensors["lora_up.weight"]?.shape == [12, 2, 1, 1])
        options.tucker = false
        let plain = try LowRankExtraction.extract(delta: wide, biasDelta: nil, options: options)
        // The Tucker split of a rank-2 down (2, 10·9) at r₂ = 2 loses what its (10, 2·9) view holds beyond rank 2.
        #expect(result.relativeError >= plain.relativeError - 1e-5)
        let down = tensors["lora_down.weight"]!.reshaped([2, 10])
        let effective = LowRankExtraction.tuckerDown(mid: tensors["lora_mid.weight"]!, down: down)
        let rebuilt = Tensor.matmul(tensors["lora_up.weight"]!.reshaped([12, 2]), effective)
        let error = (wide.reshaped([12, 90]) - rebuilt).norm / wide.norm
        #expect(abs(error - result.relativeError) < 1e-4)
    }
}
