import LycorisAlgorithms
import LycorisCore

/// Which LyCORIS LoHa and LoKr modules Hugging Face PEFT's `LoHaConfig`/`LoKrConfig` can
/// hold, and with what `r` and `alpha`.
///
/// PEFT builds every layer's factors from one config: only `r` and `alpha` vary per module
/// (`rank_pattern`, `alpha_pattern`); `use_effective_conv2d` (LoHa, LoKr), `decompose_both`
/// and `decompose_factor` (LoKr) are one value for the whole folder. PEFT's scale is
/// `alpha / r` for every module, so a module's PEFT alpha is its LyCORIS scale times its
/// PEFT r.
///
/// LoHa (keys `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `hada_t1`, `hada_t2`, the
/// same shapes as LyCORIS's): r = the rank (`hada_w1_b` first axis), LyCORIS scale α/r, so
/// PEFT alpha = α. Tucker factors (`hada_t1/t2`) need `use_effective_conv2d`; a conv with a
/// kernel other than 1×1 and no Tucker factors needs it off (PEFT turns it off for 1×1).
///
/// LoKr (keys `lokr_w1`, `lokr_w1_a/b`, `lokr_w2`, `lokr_w2_a/b`, `lokr_t2`): W1 is
/// (a, c), W2 (b, d[, k…]), with (a, b) = PEFT's factorization(out, f) and (c, d) =
/// factorization(in, f) for f = `decompose_factor` — LyCORIS's rule except that a factor f
/// dividing the dimension gives (f, dim/f) unsorted. PEFT keeps W1 whole unless
/// `decompose_both` and r < max(a, c)/2, and W2 whole iff r ≥ max(b, d)/2, so:
/// a decomposed half fixes r (its inner axis, both halves the same), a whole half bounds it
/// from below, and with both halves whole r = ⌈max(b, d)/2⌉ (and ⌈max(a, c)/2⌉ with
/// `decompose_both`). LyCORIS's scale is α/r with a decomposed half and 1 with both whole.
enum PEFTLycorisConfig {
    /// A LoKr module's factor geometry, read from its tensors and its layer's weight shape.
    struct LoKrGeometry {
        var out: Int, inChannels: Int
        /// W1 (a, c) and W2 (b, d) without the kernel.
        var w1: (Int, Int), w2: (Int, Int)
        /// The inner axis of a decomposed half; nil for a whole one.
        var w1Rank: Int?, w2Rank: Int?
        var tucker: Bool
        /// A conv kernel other than all 1s (where `use_effective_conv2d` matters).
        var spatialKernel: Bool

        init?(tensors: [String: Tensor], weightShape: [Int]) {
            guard weightShape.count >= 2 else { return nil }
            (out, inChannels) = (weightShape[0], weightShape[1])
            spatialKernel = weightShape.dropFirst(2).contains { $0 != 1 }
            tucker = tensors["lokr_t2"] != nil
            if let w1 = tensors["lokr_w1"], w1.rank == 2 {
                self.w1 = (w1.shape[0], w1.shape[1])
                w1Rank = nil
            } else if let a = tensors["lokr_w1_a"], let b = tensors["lokr_w1_b"], a.rank == 2, b.rank == 2 {
                w1 = (a.shape[0], b.shape[1])
                w1Rank = a.shape[1]
            } else {
                return nil
            }
            guard w1.0 > 0, w1.1 > 0, out % w1.0 == 0, inChannels % w1.1 == 0 else { return nil }
            w2 = (out / w1.0, inChannels / w1.1)
            if tensors["lokr_w2"] != nil {
                w2Rank = nil
            } else if let b = tensors["lokr_w2_b"], b.rank == 2 {
                w2Rank = b.shape[0]
            } else {
                return nil
            }
        }

        /// LyCORIS's scale for a file alpha (nil or 0: the rank): 1 with both halves whole.
        func lycorisScale(alpha: Float?) -> Float {
            guard let rank = w1Rank ?? w2Rank else { return 1 }
            let effective = (alpha ?? 0) == 0 ? Float(rank) : alpha!
            return effective / Float(rank)
        }
    }

    /// The folder-wide LoKr settings.
    struct LoKrSettings: Equatable {
        var decomposeFactor = -1
        var decomposeBoth = false
        var effectiveConv2d = false
    }

    /// PEFT's `factorization(dim, factor)`.
    static func peftFactorization(_ dimension: Int, factor: Int) -> (Int, Int) {
        if factor > 0 && dimension % factor == 0 { return (factor, dimension / factor) }
        let split = factorization(dimension, factor: factor)
        return (split.m, split.n)
    }

    /// The PEFT r that builds exactly `g`'s factors under `settings`; nil when none does.
    static func rank(of g: LoKrGeometry, under settings: LoKrSettings) -> Int? {
        let outSplit = peftFactorization(g.out, factor: settings.decomposeFactor)
        let inSplit = peftFactorization(g.inChannels, factor: settings.decomposeFactor)
        guard outSplit == (g.w1.0, g.w2.0), inSplit == (g.w1.1, g.w2.1) else { return nil }
        if g.spatialKernel, g.w2Rank != nil, g.tucker != settings.effectiveConv2d { return nil }
        if let r1 = g.w1Rank, let r2 = g.w2Rank, r1 != r2 { return nil }
        let (half1, half2) = (max(g.w1.0, g.w1.1), max(g.w2.0, g.w2.1))
        let r = g.w1Rank ?? g.w2Rank ?? max(1, (half2 + 1) / 2, settings.decomposeBoth ? (half1 + 1) / 2 : 1)
        let w1Whole = !(settings.decomposeBoth && 2 * r < half1)
        let w2Whole = 2 * r >= half2
        return w1Whole == (g.w1Rank == nil) && w2Whole == (g.w2Rank == nil) ? r : nil
    }

    /// The settings that hold the most modules (ties: the default factor −1, then the
    /// smaller factor, `decompose_both` off, `use_effective_conv2d` off).
    static func bestSettings(_ geometries: [LoKrGeometry]) -> LoKrSettings {
        var factors: Set<Int> = [-1]
        for g in geometries {
            factors.formUnion([g.w1.0, g.w1.1, g.w2.0, g.w2.1])
        }
        var best = LoKrSettings(), bestCount = -1
        for factor in [-1] + factors.subtracting([-1]).sorted() {
            for decomposeBoth in [false, true] {
                for effective in [false, true] {
                    let settings = LoKrSettings(decomposeFactor: factor, decomposeBoth: decomposeBoth, effectiveConv2d: effective)
                    let count = geometries.filter { rank(of: $0, under: settings) != nil }.count
                    if count > bestCount { (best, bestCount) = (settings, count) }
                }
            }
        }
        return best
    }

    /// LoHa's `use_effective_conv2d`: on when more modules need it (Tucker factors on a
    /// spatial kernel) than need it off (a spatial kernel without them).
    static func lohaEffectiveConv2d(_ modules: [(tucker: Bool, spatialKernel: Bool)]) -> Bool {
        let on = modules.filter { $0.spatialKernel && $0.tucker }.count
        let off = modules.filter { $0.spatialKernel && !$0.tucker }.count
        return on > off
    }
}
