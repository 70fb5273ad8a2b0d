/// cuBLAS (`libcublas.so.N`, from torch's `nvidia-cublas` wheel or the CUDA toolkit), loaded
/// at run time. Its version needs no GPU; GEMMs go through ``CUBLASHandle``.
///
///     cublasGetProperty(libraryPropertyType, int *)   0 major, 1 minor, 2 patch level
///     cublasCreate_v2(cublasHandle_t *) / cublasDestroy_v2(cublasHandle_t)
///     cublasSetMathMode(cublasHandle_t, cublasMath_t)  0 = CUBLAS_DEFAULT_MATH (no TF32)
///     cublasSetStream_v2(cublasHandle_t, cudaStream_t)
///     cublasSgemm_v2(handle, transa, transb, m, n, k, const float *alpha, const float *A, lda,
///                    const float *B, ldb, const float *beta, float *C, ldc)   column-major
public final class CUBLAS: @unchecked Sendable {
    public static let libraryNames = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]

    public let library: DynamicLibrary
    /// (major, minor, patch), e.g. (13, 4, 1).
    public let version: (major: Int, minor: Int, patch: Int)

    typealias Sgemm = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafePointer<Float>, UInt64,
                                      Int32, UInt64, Int32, UnsafePointer<Float>, UInt64, Int32) -> Int32
    let create: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    let destroy: @convention(c) (OpaquePointer?) -> Int32
    let setMathMode: @convention(c) (OpaquePointer?, Int32) -> Int32
    let setStream: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
    let sgemm: Sgemm

    public init(directories: [String]) throws(CUDAError) {
        library = try DynamicLibrary.load("libcublas (cuBLAS)", names: Self.libraryNames, directories: directories)
        create = try library.function("cublasCreate_v2", as: type(of: create))
        destroy = try library.function("cublasDestroy_v2", as: type(of: destroy))
        setMathMode = try library.function("cublasSetMathMode", as: type(of: setMathMode))
        setStream = try library.function("cublasSetStream_v2", as: type(of: setStream))
        sgemm = try library.function("cublasSgemm_v2", as: Sgemm.self)
        let property = try library.function("cublasGetProperty",
            as: (@convention(c) (Int32, UnsafeMutablePointer<Int32>) -> Int32).self)
        var parts: [Int] = []
        for kind: Int32 in 0...2 {
            var value: Int32 = 0
            let status = property(kind, &value)
            guard status == 0 else {
                throw .callFailed(function: "cublasGetProperty", status: status, message: "cublasStatus \(status)")
            }
            parts.append(Int(value))
        }
        version = (parts[0], parts[1], parts[2])
    }
}
