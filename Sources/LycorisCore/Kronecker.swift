/// Kronecker products of matrices with optional trailing kernel axes (LoKr's ΔW).
extension Tensor {
    /// `kron(A, B)` for A (p, q) and B (r, s, k…): result (p·r, q·s, k…) with
    /// `result[i·r + j, l·s + m, κ] = A[i, l] · B[j, m, κ]` — torch.kron of A with
    /// singleton kernel axes appended.
    public static func kronecker(_ a: Tensor, _ b: Tensor) -> Tensor {
        precondition(a.rank == 2 && b.rank >= 2, "kronecker needs A (p, q) and B (r, s, k…): \(a.shape) \(b.shape)")
        let (p, q) = (a.shape[0], a.shape[1])
        let (r, s) = (b.shape[0], b.shape[1])
        let kernel = b.shape[2...].reduce(1, *)
        var out = [Float](repeating: 0, count: p * r * q * s * kernel)
        let rowStride = q * s * kernel
        a.scalars.withUnsafeBufferPointer { pa in
            b.scalars.withUnsafeBufferPointer { pb in
                out.withUnsafeMutableBufferPointer { po in
                    for i in 0..<p {
                        for j in 0..<r {
                            let row = (i * r + j) * rowStride
                            for l in 0..<q {
                                let av = pa[i * q + l]
                                let bRow = j * s * kernel
                                let dst = row + l * s * kernel
                                for t in 0..<(s * kernel) { po[dst + t] = av * pb[bRow + t] }
                            }
                        }
                    }
                }
            }
        }
        return Tensor(shape: [p * r, q * s] + Array(b.shape[2...]), scalars: out)
    }

    /// Gradients of `kron(A, B)` given G = ∂L/∂kron (p·r, q·s, k…):
    /// `∂A[i,l] = Σ_{j,m,κ} G[i·r+j, l·s+m, κ] · B[j,m,κ]`,
    /// `∂B[j,m,κ] = Σ_{i,l} G[i·r+j, l·s+m, κ] · A[i,l]`.
    public static func kroneckerBackward(_ gradient: Tensor, _ a: Tensor, _ b: Tensor) -> (a: Tensor, b: Tensor) {
        let (p, q) = (a.shape[0], a.shape[1])
        let (r, s) = (b.shape[0], b.shape[1])
        let kernel = b.shape[2...].reduce(1, *)
        // View G as (p, r, q, s·k) and permute to (p, q, r, s·k): each (i, l) block is a
        // copy-shaped slab of B's layout.
        let blocks = gradient.reshaped([p, r, q, s * kernel]).permuted([0, 2, 1, 3])
            .reshaped([p * q, r * s * kernel])
        let gradA = Tensor.matmul(blocks, b.reshaped([r * s * kernel, 1])).reshaped([p, q])
        let gradB = Tensor.matmul(a.reshaped([1, p * q]), blocks).reshaped(b.shape)
        return (gradA, gradB)
    }
}
