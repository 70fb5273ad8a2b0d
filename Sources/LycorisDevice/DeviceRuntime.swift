/// What the device backend needs of a device: memory, copies, the kernels of
/// Sources/LycorisCUDA/Kernels/lycoris_kernels.cu and a float32 GEMM with cuBLAS's semantics.
///
/// Ordering: ``launch(_:)``, ``sgemm(transposeA:transposeB:m:n:k:alpha:a:lda:b:ldb:beta:c:ldc:)``,
/// ``copy(_:from:to:)`` and ``fillZero(_:count:)`` are queued in order on the runtime's one
/// stream and may return before they ran; ``read(_:count:)`` and ``synchronize()`` wait for
/// everything queued. Addresses and counts are of float32 elements' memory; counts in elements.
///
/// Implementations: ``CUDADevice`` (a GPU through the driver API and cuBLAS) and
/// ``EmulatedDevice`` (host memory, the same kernel source compiled as C, OpenBLAS) — the
/// test device that lets every caller of this protocol run without a GPU.
public protocol DeviceRuntime: AnyObject {
    /// What the runtime computes on, for logs and errors ("emulated", "cuda:0 NVIDIA H100 …").
    var description: String { get }
    /// `count` floats of device memory (uninitialised); ``free(_:)`` gives it back.
    func allocate(_ count: Int) throws -> UInt64
    func free(_ address: UInt64) throws
    /// `values` copied to `address` (returns when copied).
    func write(_ values: [Float], to address: UInt64) throws
    /// `count` floats at `address`, after everything queued before has run.
    func read(_ address: UInt64, count: Int) throws -> [Float]
    /// `count` floats from `source` to `destination` (queued).
    func copy(_ count: Int, from source: UInt64, to destination: UInt64) throws
    /// `count` floats at `address` set to 0 (queued).
    func fillZero(_ address: UInt64, count: Int) throws
    /// One kernel over its threads (queued).
    func launch(_ kernel: DeviceKernel) throws
    /// cuBLAS's column-major `C = α · op(A) · op(B) + β · C`: op(A) (m × k), op(B) (k × n),
    /// C (m × n), each with its leading dimension (queued). With k = 0, C = β · C.
    func sgemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int,
               b: UInt64, ldb: Int, beta: Float, c: UInt64, ldc: Int) throws
    /// Waits until everything queued has run.
    func synchronize() throws
}

/// A device runtime's failure that is not a CUDA library's own error (``CUDAError``).
public struct DeviceRuntimeError: Error, Equatable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
