import LycorisCore

/// The Tucker-2 rebuild LyCORIS uses for k×k kernels (LoCon `lora_mid`, LoHa `hada_t*`,
/// LoKr `lokr_t2`):
///
///     W[p, q, κ] = Σ_{i,j} core[i, j, κ] · a[i, p] · b[j, q]
///
/// core (r₁, r₂, k…), a (r₁, out), b (r₂, in) → W (out, in, k…)
/// (einsum `"ij…, ip, jr -> pr…"`).
enum TuckerProduct {
    static func rebuild(core: Tensor, a: Tensor, b: Tensor) -> Tensor {
        let (r1, r2) = (core.shape[0], core.shape[1])
        let kernel = Array(core.shape[2...])
        let k = kernel.reduce(1, *)
        let (out, inn) = (a.shape[1], b.shape[1])
        // V[p, j, κ] = Σ_i a[i, p] core[i, j, κ]
        let v = Tensor.matmul(a, transposeA: true, core.reshaped([r1, r2 * k]))      // (out, r2·k)
        // W[p, q, κ] = Σ_j b[j, q] V[p, j, κ]: bring j to the front.
        let vj = v.reshaped([out, r2, k]).permuted([1, 0, 2]).reshaped([r2, out * k])
        let w = Tensor.matmul(b, transposeA: true, vj)                                 // (in, out·k)
        return w.reshaped([inn, out, k]).permuted([1, 0, 2]).reshaped([out, inn] + kernel)
    }

    /// Gradients of ``rebuild(core:a:b:)`` given G = ∂L/∂W (out, in, k…).
    static func backward(_ gradient: Tensor, core: Tensor, a: Tensor, b: Tensor) -> (core: Tensor, a: Tensor, b: Tensor) {
        let (r1, r2) = (core.shape[0], core.shape[1])
        let k = core.shape[2...].reduce(1, *)
        let (out, inn) = (a.shape[1], b.shape[1])
        let v = Tensor.matmul(a, transposeA: true, core.reshaped([r1, r2 * k]))      // (out, r2·k)
        let vj = v.reshaped([out, r2, k]).permuted([1, 0, 2]).reshaped([r2, out * k])
        let gq = gradient.reshaped([out, inn, k]).permuted([1, 0, 2]).reshaped([inn, out * k])
        // ∂b[j, q] = Σ_{p,κ} V[p, j, κ] G[p, q, κ]
        let gradB = Tensor.matmul(vj, gq, transposeB: true)                             // (r2, in)
        // ∂V[p, j, κ] = Σ_q b[j, q] G[p, q, κ]
        let gradV = Tensor.matmul(b, gq).reshaped([r2, out, k]).permuted([1, 0, 2]).reshaped([out, r2 * k])
        // ∂a[i, p] = Σ_{j,κ} core[i, j, κ] ∂V[p, j, κ]
        let gradA = Tensor.matmul(core.reshaped([r1, r2 * k]), gradV, transposeB: true)  // (r1, out)
        // ∂core[i, j, κ] = Σ_p a[i, p] ∂V[p, j, κ]
        let gradCore = Tensor.matmul(a, gradV).reshaped(core.shape)
        return (gradCore, gradA, gradB)
    }
}
