import LycorisCore

/// The output-row norms of V = W0 + f·U·D for DoRA around a plain LoCon (no Tucker core, no
/// trainable scalar), and the norm term's factor gradients, without forming V:
///
///     U = lora_up (out, r), D = lora_down (r, n), n = in·K, f = scale, W0 (out, n)
///     P = W0·Dᵀ (out, r),   Q = D·Dᵀ (r, r)
///     ‖V_o‖² = ‖W0_o‖² + 2f·⟨U_o, P_o⟩ + f²·⟨U_o, (U·Q)_o⟩
///
/// and for ∂ΔW = k ⊙_rows V (the norm's term, k per output row) LoCon's ∂up = f·∂ΔW·Dᵀ,
/// ∂down = f·Uᵀ·∂ΔW become
///
///     ∂up   = f·k ⊙_rows (P + f·U·Q)                    (out, r)
///     ∂down = f·((k ⊙ U)ᵀ·W0 + f·((k ⊙ U)ᵀ·U)·D)        (r, n)
///
/// Cost: W0·Dᵀ and (k ⊙ U)ᵀ·W0, two out·n·r GEMMs that read W0, one pass for ‖W0_o‖², and
/// r-sized products — no W-sized buffer (the explicit path forms ΔW and V and scales V).
/// The row sums of the norm are added in Double.
struct LowRankRowNorms {
    let up: Tensor, down: Tensor, baseWeight: Tensor
    let f: Float
    let p: Tensor, q: Tensor
    let norms: [Float]

    /// Nil unless `base` is a LoCon without a Tucker core or a scalar.
    init?<Base: AdapterAlgorithm>(_ base: Base, baseWeight w0: Tensor) {
        guard let locon = base as? LoCon, locon.parameters["lora_mid.weight"] == nil, locon.parameters["scalar"] == nil,
              let up = locon.parameters["lora_up.weight"], let down = locon.parameters["lora_down.weight"] else { return nil }
        let rank = down.shape[0]
        self.up = up.reshaped([up.shape[0], rank])
        self.down = down.reshaped([rank, down.count / rank])
        baseWeight = w0.reshaped([w0.shape[0], w0.count / w0.shape[0]])
        f = locon.scale
        p = Tensor.matmul(baseWeight, transposeA: false, self.down, transposeB: true, alpha: 1)
        q = Tensor.matmul(self.down, transposeA: false, self.down, transposeB: true, alpha: 1)
        let uq = Tensor.matmul(self.up, transposeA: false, q, transposeB: false, alpha: 1)
        let w0Squares = baseWeight.channelSums(ChannelLayout(count: baseWeight.count, channels: baseWeight.shape[0],
                                                             inner: baseWeight.shape[1]), times: baseWeight)
        let (u, pp, uqs, f) = (self.up.scalars, p.scalars, uq.scalars, Double(locon.scale))
        norms = w0Squares.indices.map { o in
            var cross = 0.0, square = 0.0
            for j in (o * rank)..<((o + 1) * rank) {
                cross += Double(u[j]) * Double(pp[j])
                square += Double(u[j]) * Double(uqs[j])
            }
            return Float(max(Double(w0Squares[o]) + 2 * f * cross + f * f * square, 0).squareRoot())
        }
    }

    /// LoCon's gradients (its parameter shapes) from ∂ΔW = k ⊙_rows V.
    func normTermGradients(_ k: [Float], upShape: [Int], downShape: [Int]) -> ParameterSet {
        let rank = down.shape[0]
        let kUp = Tensor(shape: up.shape, scalars: up.scalars.indices.map { up.scalars[$0] * k[$0 / rank] })
        var pu = p
        pu.add(Tensor.matmul(up, transposeA: false, q, transposeB: false, alpha: f))
        let gradUp = Tensor(shape: up.shape, scalars: pu.scalars.indices.map { f * k[$0 / rank] * pu.scalars[$0] })
        var gradDown = Tensor.matmul(kUp, transposeA: true, baseWeight, transposeB: false, alpha: f)
        let kuu = Tensor.matmul(kUp, transposeA: true, up, transposeB: false, alpha: 1)
        gradDown.add(Tensor.matmul(kuu, transposeA: false, down, transposeB: false, alpha: f * f))
        return ParameterSet([("lora_down.weight", gradDown.reshaped(downShape)), ("lora_up.weight", gradUp.reshaped(upShape))])
    }
}
