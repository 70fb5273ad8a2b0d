/// A cuBLAS handle in the current CUDA context, in the default math mode (no TF32, so products
/// match the CPU engine's float32 to rounding): cuBLAS's column-major SGEMM on device memory,
/// and a row-major product on top of it.
///
/// Row-major C (m × n) = α · A (m × k) · B (k × n) is column-major Cᵀ = α · Bᵀ · Aᵀ: one
/// `cublasSgemm` with the operands swapped, no transposes, leading dimensions n, k, n.
///
/// NOT YET RUN ON A GPU: the CUDA probe's kernel check and LycorisDevice's `CUDADevice` use it
/// where a device is available.
public final class CUBLASHandle {
    public let cublas: CUBLAS
    private let handle: OpaquePointer?

    public init(_ cublas: CUBLAS) throws(CUDAError) {
        self.cublas = cublas
        var handle: OpaquePointer?
        try Self.check("cublasCreate_v2", cublas.create(&handle))
        self.handle = handle
        try Self.check("cublasSetMathMode", cublas.setMathMode(handle, 0))
    }

    deinit { _ = cublas.destroy(handle) }

    /// Queues this handle's work on `stream` (nil: the default stream).
    public func use(stream: OpaquePointer?) throws(CUDAError) {
        try Self.check("cublasSetStream_v2", cublas.setStream(handle, stream))
    }

    /// cuBLAS's `C = α · op(A) · op(B) + β · C`, column-major: op(A) (m × k), op(B) (k × n),
    /// C (m × n), each with its leading dimension.
    public func sgemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int,
                      b: UInt64, ldb: Int, beta: Float, c: UInt64, ldc: Int) throws(CUDAError) {
        var alpha = alpha, beta = beta
        let status = cublas.sgemm(handle, transposeA ? 1 : 0, transposeB ? 1 : 0, Int32(m), Int32(n), Int32(k), &alpha,
                                  a, Int32(lda), b, Int32(ldb), &beta, c, Int32(ldc))
        try Self.check("cublasSgemm_v2", status)
    }

    /// c (m × n) = alpha · a (m × k) · b (k × n), row-major device matrices.
    public func gemm(m: Int, n: Int, k: Int, alpha: Float, a: UInt64, b: UInt64, c: UInt64) throws(CUDAError) {
        try sgemm(transposeA: false, transposeB: false, m: n, n: m, k: k, alpha: alpha, a: b, lda: n, b: a, ldb: k,
                  beta: 0, c: c, ldc: n)
    }

    private static func check(_ function: String, _ status: Int32) throws(CUDAError) {
        guard status != 0 else { return }
        throw .callFailed(function: function, status: status, message: "cublasStatus \(status)")
    }
}
