import COpenBLAS

/// Matrix products through OpenBLAS `cblas_sgemm` (row-major).
public enum BLAS {
    /// `C = α · op(A) · op(B) + β · C` on raw row-major storage: op(A) (m, k) with leading
    /// dimension `lda`, op(B) (k, n) with `ldb`, C (m, n) with `ldc`. With k = 0, C = β·C.
    public static func sgemm(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float,
        a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        guard m > 0, n > 0 else { return }
        if k == 0 {
            for row in 0..<m { for column in 0..<n { c[row * ldc + column] *= beta } }
            return
        }
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }
}

extension Tensor {
    /// `C = α · op(A) · op(B) + β · C` on matrices, where op is the identity or the
    /// transpose. Shapes: op(A) (m, k), op(B) (k, n), C (m, n).
    public static func gemm(
        _ a: Tensor, transposeA: Bool = false,
        _ b: Tensor, transposeB: Bool = false,
        alpha: Float = 1, beta: Float = 0, into c: inout Tensor
    ) {
        precondition(a.rank == 2 && b.rank == 2 && c.rank == 2, "gemm needs matrices: \(a.shape) \(b.shape) \(c.shape)")
        let m = transposeA ? a.shape[1] : a.shape[0]
        let k = transposeA ? a.shape[0] : a.shape[1]
        let kB = transposeB ? b.shape[1] : b.shape[0]
        let n = transposeB ? b.shape[0] : b.shape[1]
        precondition(k == kB, "gemm inner dimensions differ: \(a.shape)\(transposeA ? "ᵀ" : "") · \(b.shape)\(transposeB ? "ᵀ" : "")")
        precondition(c.shape == [m, n], "gemm output \(c.shape) is not [\(m), \(n)]")
        a.scalars.withUnsafeBufferPointer { pa in
            b.scalars.withUnsafeBufferPointer { pb in
                c.scalars.withUnsafeMutableBufferPointer { pc in
                    guard let pa = pa.baseAddress, let pb = pb.baseAddress, let pc = pc.baseAddress else { return }
                    BLAS.sgemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, alpha: alpha,
                               a: pa, lda: a.shape[1], b: pb, ldb: b.shape[1], beta: beta, c: pc, ldc: n)
                }
            }
        }
    }

    /// `α · op(A) · op(B)` as a new matrix (its storage is written once, by the GEMM).
    public static func matmul(
        _ a: Tensor, transposeA: Bool = false,
        _ b: Tensor, transposeB: Bool = false,
        alpha: Float = 1
    ) -> Tensor {
        let m = transposeA ? a.shape[1] : a.shape[0]
        let n = transposeB ? b.shape[0] : b.shape[1]
        let k = transposeA ? a.shape[0] : a.shape[1]
        guard k > 0 else { return .zeros([m, n]) }
        var c = Tensor(uninitializedShape: [m, n])
        gemm(a, transposeA: transposeA, b, transposeB: transposeB, alpha: alpha, into: &c)
        return c
    }

    /// The tensor viewed as a matrix: the first `rowAxes` axes become rows, the rest columns.
    public func flattenedToMatrix(rowAxes: Int = 1) -> Tensor {
        reshaped([shape[..<rowAxes].reduce(1, *), shape[rowAxes...].reduce(1, *)])
    }
}

/// The OpenBLAS thread pool shared by every BLAS call of the process.
public enum BLASThreads {
    /// Sets the number of threads OpenBLAS uses; call once at start.
    public static func set(_ count: Int) { openblas_set_num_threads(Int32(Swift.max(1, count))) }
    public static var current: Int { Int(openblas_get_num_threads()) }
}
