import LycorisCore

/// The Tucker-2 rebuild LyCORIS uses for k×k kernels (LoCon `lora_mid`, LoHa `hada_t*`,
/// LoKr `lokr_t2`):
///
///     W[p, q, κ] = Σ_{i,j} core[i, j, κ] · a[i, p] · b[j, q]
///
/// core (r₁, r₂, k…), a (r₁, out), b (r₂, in) → W (out, in, k…)
/// (einsum `"ij…, ip, jr -> pr…"`).
///
/// Generic over the ``WeightAlgebra`` (host tensors or device memory); `alpha` scales W (and
/// so every gradient) inside the last product instead of in a pass of its own.
enum TuckerProduct {
    static func rebuild<A: WeightAlgebra>(_ algebra: A, core: A.Value, a: A.Value, b: A.Value, alpha: Float = 1) -> A.Value {
        let coreShape = algebra.shape(of: core)
        let (r1, r2) = (coreShape[0], coreShape[1])
        let kernel = Array(coreShape[2...])
        let k = kernel.reduce(1, *)
        let (out, inn) = (algebra.shape(of: a)[1], algebra.shape(of: b)[1])
        // V[p, j, κ] = Σ_i a[i, p] core[i, j, κ]
        let v = algebra.matmul(a, transposeA: true, algebra.reshaped(core, [r1, r2 * k]))        // (out, r2·k)
        // W[p, q, κ] = Σ_j b[j, q] V[p, j, κ]: bring j to the front.
        let vj = algebra.reshaped(algebra.swappingMiddleAxes(v, [1, out, r2, k]), [r2, out * k])
        let w = algebra.matmul(b, transposeA: true, vj, transposeB: false, alpha: alpha)          // (in, out·k)
        return algebra.reshaped(algebra.swappingMiddleAxes(w, [1, inn, out, k]), [out, inn] + kernel)
    }

    /// Gradients of ``rebuild(_:core:a:b:alpha:)`` given G = ∂L/∂W (out, in, k…).
    static func backward<A: WeightAlgebra>(_ algebra: A, _ gradient: A.Value, core: A.Value, a: A.Value, b: A.Value,
                                           alpha: Float = 1) -> (core: A.Value, a: A.Value, b: A.Value) {
        let coreShape = algebra.shape(of: core)
        let (r1, r2) = (coreShape[0], coreShape[1])
        let k = coreShape[2...].reduce(1, *)
        let (out, inn) = (algebra.shape(of: a)[1], algebra.shape(of: b)[1])
        let v = algebra.matmul(a, transposeA: true, algebra.reshaped(core, [r1, r2 * k]))        // (out, r2·k)
        let vj = algebra.reshaped(algebra.swappingMiddleAxes(v, [1, out, r2, k]), [r2, out * k])
        let gq = algebra.reshaped(algebra.swappingMiddleAxes(gradient, [1, out, inn, k]), [inn, out * k])
        // ∂b[j, q] = Σ_{p,κ} V[p, j, κ] G[p, q, κ]
        let gradB = algebra.matmul(vj, transposeA: false, gq, transposeB: true, alpha: alpha)     // (r2, in)
        // ∂V[p, j, κ] = Σ_q b[j, q] G[p, q, κ]
        let bg = algebra.matmul(b, transposeA: false, gq, transposeB: false, alpha: alpha)       // (r2, out·k)
        let gradV = algebra.reshaped(algebra.swappingMiddleAxes(bg, [1, r2, out, k]), [out, r2 * k])
        // ∂a[i, p] = Σ_{j,κ} core[i, j, κ] ∂V[p, j, κ]
        let gradA = algebra.matmul(algebra.reshaped(core, [r1, r2 * k]), gradV, transposeB: true) // (r1, out)
        // ∂core[i, j, κ] = Σ_p a[i, p] ∂V[p, j, κ]
        let gradCore = algebra.reshaped(algebra.matmul(a, gradV), coreShape)
        return (gradCore, gradA, gradB)
    }
}
