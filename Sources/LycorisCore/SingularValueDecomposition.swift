import COpenBLAS

/// The thin singular value decomposition A = U·diag(S)·Vᵀ of a matrix A (m, n), computed in
/// double precision by LAPACK `dgesdd` (k = min(m, n); S descending).
///
/// LAPACK is column-major, so A's row-major buffer is Aᵀ (n, m) to it. Decomposing
/// Aᵀ = U'·S·V'ᵀ gives A = V'·S·U'ᵀ: LAPACK's `vt` (k × m column-major) read row-major is
/// U (m, k), and its `u` (n × k column-major) read row-major is Vᵀ (k, n).
public struct SingularValueDecomposition: Sendable {
    /// (m, k), orthonormal columns.
    public let u: Tensor
    /// (k,), descending, ≥ 0.
    public let singularValues: Tensor
    /// Vᵀ (k, n), orthonormal rows.
    public let vt: Tensor

    /// The decomposition of `matrix` (m, n); nil when it is not finite or LAPACK does not
    /// converge.
    public init?(_ matrix: Tensor) {
        precondition(matrix.rank == 2, "SVD of a \(matrix.rank)-D tensor")
        let (m, n) = (matrix.shape[0], matrix.shape[1])
        guard matrix.isFinite, m > 0, n > 0 else { return nil }
        let k = min(m, n)
        var a = matrix.scalars.map(Double.init)
        var rows = Int32(n), columns = Int32(m), lda = Int32(n), ldu = Int32(n), ldvt = Int32(k)
        var s = [Double](repeating: 0, count: k)
        var lapackU = [Double](repeating: 0, count: n * k)
        var lapackVT = [Double](repeating: 0, count: k * m)
        var iwork = [Int32](repeating: 0, count: 8 * k)
        var info: Int32 = 0
        var jobz: CChar = 83  // "S": the k leading vectors
        var query = 0.0
        var lwork: Int32 = -1
        dgesdd_(&jobz, &rows, &columns, &a, &lda, &s, &lapackU, &ldu, &lapackVT, &ldvt, &query, &lwork, &iwork, &info, 1)
        guard info == 0 else { return nil }
        lwork = Int32(query)
        var work = [Double](repeating: 0, count: Int(lwork))
        dgesdd_(&jobz, &rows, &columns, &a, &lda, &s, &lapackU, &ldu, &lapackVT, &ldvt, &work, &lwork, &iwork, &info, 1)
        guard info == 0 else { return nil }
        u = Tensor(shape: [m, k], scalars: lapackVT.map(Float.init))
        singularValues = Tensor(shape: [k], scalars: s.map(Float.init))
        vt = Tensor(shape: [k, n], scalars: lapackU.map(Float.init))
    }
}
