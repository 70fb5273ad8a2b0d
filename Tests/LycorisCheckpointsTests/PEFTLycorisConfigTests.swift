import LycorisAlgorithms
import LycorisCore
import Testing
@testable import LycorisCheckpoints

/// Which PEFT `LoKrConfig` rebuilds a LyCORIS LoKr module's factors, checked against PEFT
/// 0.22's rules written out by hand (W1 whole unless decompose_both and 2r < max(a, c); W2
/// whole iff 2r ≥ max(b, d); factorization(dim, f) = (f, dim/f) for f dividing dim).
@Suite("PEFT LoKr config")
struct PEFTLycorisConfigTests {
    static func geometry(out: Int, in inChannels: Int, w1: [Int], w1Rank: Int? = nil, w2Rank: Int? = nil) -> PEFTLycorisConfig.LoKrGeometry {
        var tensors: [String: Tensor] = [:]
        let (b, d) = (out / w1[0], inChannels / w1[1])
        if let r = w1Rank {
            tensors["lokr_w1_a"] = Tensor.zeros([w1[0], r])
            tensors["lokr_w1_b"] = Tensor.zeros([r, w1[1]])
        } else {
            tensors["lokr_w1"] = Tensor.zeros(w1)
        }
        if let r = w2Rank {
            tensors["lokr_w2_a"] = Tensor.zeros([b, r])
            tensors["lokr_w2_b"] = Tensor.zeros([r, d])
        } else {
            tensors["lokr_w2"] = Tensor.zeros([b, d])
        }
        return PEFTLycorisConfig.LoKrGeometry(tensors: tensors, weightShape: [out, inChannels])!
    }

    @Test("PEFT's factorization leaves a dividing factor first; LyCORIS sorts it")
    func factorizations() {
        #expect(PEFTLycorisConfig.peftFactorization(4, factor: 4) == (4, 1))
        #expect(factorization(4, factor: 4) == (1, 4))
        #expect(PEFTLycorisConfig.peftFactorization(320, factor: -1) == (16, 20))
        #expect(PEFTLycorisConfig.peftFactorization(360, factor: 16) == (15, 24))
    }

    @Test("r per module: a decomposed half fixes it, whole halves bound it, a mismatch has none")
    func ranks() {
        let plain = PEFTLycorisConfig.LoKrSettings()
        let both = PEFTLycorisConfig.LoKrSettings(decomposeFactor: -1, decomposeBoth: true, effectiveConv2d: false)
        // 64 × 64 with factor −1: W1 (8, 8), W2 (8, 8).
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8], w2Rank: 3), under: plain) == 3)
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8], w2Rank: 4), under: plain) == nil)  // 2·4 ≥ 8: PEFT keeps W2 whole
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8]), under: plain) == 4)
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8], w1Rank: 2, w2Rank: 2), under: plain) == nil)
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8], w1Rank: 2, w2Rank: 2), under: both) == 2)
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [8, 8], w2Rank: 2), under: both) == nil)  // whole W1 needs 2r ≥ 8
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [4, 4]), under: plain) == nil)  // factor −1 gives (8, 8)
        let four = PEFTLycorisConfig.LoKrSettings(decomposeFactor: 4, decomposeBoth: false, effectiveConv2d: false)
        #expect(PEFTLycorisConfig.rank(of: Self.geometry(out: 64, in: 64, w1: [4, 4]), under: four) == 8)
        #expect(PEFTLycorisConfig.bestSettings([Self.geometry(out: 64, in: 64, w1: [4, 4]), Self.geometry(out: 32, in: 64, w1: [4, 4])]) == four)
    }

    @Test("LyCORIS's scale: alpha/r with a decomposed half (0 or none: r), 1 with both whole")
    func scales() {
        #expect(Self.geometry(out: 64, in: 64, w1: [8, 8], w2Rank: 2).lycorisScale(alpha: 3) == 1.5)
        #expect(Self.geometry(out: 64, in: 64, w1: [8, 8], w2Rank: 2).lycorisScale(alpha: 0) == 1)
        #expect(Self.geometry(out: 64, in: 64, w1: [8, 8]).lycorisScale(alpha: 3) == 1)
    }
}
