/// cuBLAS (`libcublas.so.N`, from torch's `nvidia-cublas` wheel or the CUDA toolkit), loaded
/// at run time. So far only its version is read, which needs no GPU:
///
///     cublasGetProperty(libraryPropertyType, int *)   0 major, 1 minor, 2 patch level
///
/// The GEMMs of the CUDA backend will go through `cublasSgemm` with the default math mode
/// (no TF32), so that results match the CPU engine's float32.
public final class CUBLAS: @unchecked Sendable {
    public static let libraryNames = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]

    public let library: DynamicLibrary
    /// (major, minor, patch), e.g. (13, 4, 1).
    public let version: (major: Int, minor: Int, patch: Int)

    public init(directories: [String]) throws(CUDAError) {
        library = try DynamicLibrary.load("libcublas (cuBLAS)", names: Self.libraryNames, directories: directories)
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
