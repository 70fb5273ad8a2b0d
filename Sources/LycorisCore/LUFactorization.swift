import COpenBLAS

/// LU factorisation with partial pivoting of a square matrix A (LAPACK `sgetrf`), and the
/// products with A⁻¹ it answers by solving (`sgetrs`), never forming the inverse.
///
/// LAPACK is column-major, so the row-major buffer of a matrix M is Mᵀ to it. The buffer of
/// A is factored as Aᵀ; a row-major right-hand side B (rows × n) is Bᵀ (n × rows) to
/// LAPACK, and `sgetrs` 'N' solves Aᵀ·Y = Bᵀ — Y read back row-major is B·A⁻¹ — while 'T'
/// solves A·Y = Bᵀ, read back as B·A⁻ᵀ.
public struct LUFactorization: Sendable {
    /// n, for A (n, n).
    public let order: Int
    private let factors: [Float]
    private let pivots: [Int32]

    /// The factorisation of `matrix` (n, n); nil when it is exactly singular or not finite.
    public init?(_ matrix: Tensor) {
        precondition(matrix.rank == 2 && matrix.shape[0] == matrix.shape[1], "LU of a non-square \(matrix.shape)")
        guard matrix.isFinite else { return nil }
        var n = Int32(matrix.shape[0])
        var lda = n
        var info: Int32 = 0
        var a = matrix.scalars
        var ipiv = [Int32](repeating: 0, count: Int(n))
        sgetrf_(&n, &n, &a, &lda, &ipiv, &info)
        guard info == 0 else { return nil }
        order = Int(n)
        factors = a
        pivots = ipiv
    }

    private func solve(_ b: Tensor, transpose: Bool) -> Tensor {
        precondition(b.rank == 2 && b.shape[1] == order, "right-hand side \(b.shape) for an LU of order \(order)")
        guard b.shape[0] > 0 else { return b }
        var n = Int32(order)
        var rows = Int32(b.shape[0])
        var info: Int32 = 0
        var x = b.scalars
        var trans: CChar = transpose ? 84 : 78  // "T" / "N"
        sgetrs_(&trans, &n, &rows, factors, &n, pivots, &x, &n, &info, 1)
        precondition(info == 0, "sgetrs failed with info \(info)")
        return Tensor(shape: b.shape, scalars: x)
    }

    /// B·A⁻¹ for B (rows, n).
    public func rightDivide(_ b: Tensor) -> Tensor { solve(b, transpose: false) }

    /// B·A⁻ᵀ for B (rows, n).
    public func rightDivideTransposed(_ b: Tensor) -> Tensor { solve(b, transpose: true) }

    /// A⁻¹·B for B (n, columns): (Bᵀ·A⁻ᵀ)ᵀ.
    public func leftDivide(_ b: Tensor) -> Tensor { solve(b.transposed, transpose: true).transposed }
}
