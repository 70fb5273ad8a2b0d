import LycorisCore

/// The CUDA probe's end-to-end check of the kernel path on a device: ``KernelSource`` compiled
/// by NVRTC for the device's compute capability, loaded by the driver, and
/// `lycoris_hadamard` run on 4096 elements whose exact result is known
/// (0.5 · i · 2 = i for i < 4096, exact in float32); then a LoRA ΔW = 0.5 · up (320 × 8) ·
/// down (8 × 768) by cuBLAS (default math, no TF32) against the CPU engine's GEMM, relative
/// error ≤ 1e-5. Reported under `capabilities.cuda.kernels`.
///
/// NOT YET RUN ON A GPU: it runs only where the probe finds a device.
public enum CUDAKernelCheck {
    /// A description of what passed, or the error.
    public static func run(driver: CUDADriver, nvrtc: NVRTC, cublas: CUBLAS, device: Int) -> Result<String, CUDAError> {
        Result { () throws(CUDAError) -> String in
            let capability = driver.devices[device].computeCapability
            let ptx = try nvrtc.compile(KernelSource.text, name: "lycoris_kernels.cu",
                                        options: ["--gpu-architecture=compute_\(capability.major)\(capability.minor)"])
            let context = try CUDAContext(driver: driver, device: device)
            let hadamard = try context.function("lycoris_hadamard", in: context.module(ptx: ptx))
            let count = 4096
            let a = try context.allocate(count, from: (0..<count).map(Float.init))
            let b = try context.allocate(count, from: [Float](repeating: 2, count: count))
            let out = try context.allocate(count)
            defer { for address in [a, b, out] { try? context.free(address) } }
            try context.launch(hadamard, count: count, [.pointer(out), .pointer(a), .pointer(b), .float(0.5), .u64(UInt64(count))])
            try context.synchronize()
            let result = try context.read(out, count: count)
            if let wrong = result.indices.first(where: { result[$0] != Float($0) }) {
                throw .wrongResult("lycoris_hadamard gave \(result[wrong]) at \(wrong), expected \(wrong)")
            }
            let error = try loraError(context, CUBLASHandle(cublas))
            return "NVRTC compute_\(capability.major)\(capability.minor), lycoris_hadamard on \(count) elements exact; "
                + "cuBLAS LoRA ΔW 320x8 · 8x768 vs the CPU engine: relative error \(error)"
        }
    }

    /// The relative error of cuBLAS's 0.5 · up · down against the CPU engine's (throws above 1e-5).
    static func loraError(_ context: CUDAContext, _ blas: CUBLASHandle) throws(CUDAError) -> Float {
        let (rows, rank, columns) = (320, 8, 768)
        // Values in [-0.5, 0.5) from a fixed sequence; any would do.
        let up = Tensor(shape: [rows, rank], scalars: (0..<(rows * rank)).map { Float($0 * 37 % 101) / 101 - 0.5 })
        let down = Tensor(shape: [rank, columns], scalars: (0..<(rank * columns)).map { Float($0 * 53 % 97) / 97 - 0.5 })
        let expected = Tensor.matmul(up, down, alpha: 0.5)
        let a = try context.allocate(up.count, from: up.scalars)
        let b = try context.allocate(down.count, from: down.scalars)
        let c = try context.allocate(expected.count)
        defer { for address in [a, b, c] { try? context.free(address) } }
        try blas.gemm(m: rows, n: columns, k: rank, alpha: 0.5, a: a, b: b, c: c)
        try context.synchronize()
        let result = try context.read(c, count: expected.count)
        let worst = zip(result, expected.scalars).map { abs($0 - $1) }.max() ?? 0
        let error = worst / expected.maxAbs
        guard error <= 1e-5 else { throw .wrongResult("cuBLAS LoRA ΔW differs from the CPU engine's by \(error) relative") }
        return error
    }
}
