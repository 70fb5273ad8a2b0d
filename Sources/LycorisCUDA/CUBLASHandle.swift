/// A cuBLAS handle in the current CUDA context, in the default math mode (no TF32, so products
/// match the CPU engine's float32 to rounding), with row-major SGEMM on device memory.
///
/// Row-major C (m × n) = α · A (m × k) · B (k × n) is column-major Cᵀ = α · Bᵀ · Aᵀ: one
/// `cublasSgemm` with the operands swapped, no transposes, leading dimensions n, k, n.
///
/// NOT YET RUN ON A GPU: the CUDA probe's kernel check uses it where a device is available.
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

    /// c (m × n) = alpha · a (m × k) · b (k × n), row-major device matrices.
    public func gemm(m: Int, n: Int, k: Int, alpha: Float, a: UInt64, b: UInt64, c: UInt64) throws(CUDAError) {
        var alpha = alpha, beta: Float = 0
        let status = cublas.sgemm(handle, 0, 0, Int32(n), Int32(m), Int32(k), &alpha, b, Int32(n), a, Int32(k), &beta, c, Int32(n))
        try Self.check("cublasSgemm_v2", status)
    }

    private static func check(_ function: String, _ status: Int32) throws(CUDAError) {
        guard status != 0 else { return }
        throw .callFailed(function: function, status: status, message: "cublasStatus \(status)")
    }
}
