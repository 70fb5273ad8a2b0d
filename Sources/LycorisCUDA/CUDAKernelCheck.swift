/// The CUDA probe's end-to-end check of the kernel path on a device: ``KernelSource`` compiled
/// by NVRTC for the device's compute capability, loaded by the driver, and
/// `lycoris_hadamard` run on 4096 elements whose exact result is known
/// (0.5 · i · 2 = i for i < 4096, exact in float32). Reported under `capabilities.cuda.kernels`.
///
/// NOT YET RUN ON A GPU: it runs only where the probe finds a device.
public enum CUDAKernelCheck {
    /// A description of what passed, or the error.
    public static func run(driver: CUDADriver, nvrtc: NVRTC, device: Int) -> Result<String, CUDAError> {
        Result { () throws(CUDAError) -> String in
            let capability = driver.devices[device].computeCapability
            let ptx = try nvrtc.compile(KernelSource.text, name: "lycoris_kernels.cu",
                                        options: ["--gpu-architecture=compute_\(capability.major)\(capability.minor)"])
            let context = try CUDAContext(driver: driver, device: device)
            let hadamard = try context.function("lycoris_hadamard", ptx: ptx)
            let count = 4096
            let a = try context.allocate(count, from: (0..<count).map(Float.init))
            let b = try context.allocate(count, from: [Float](repeating: 2, count: count))
            let out = try context.allocate(count)
            defer { for address in [a, b, out] { try? context.free(address) } }
            try context.launch(hadamard, count: count, [.pointer(out), .pointer(a), .pointer(b), .float(0.5), .u64(UInt64(count))])
            let result = try context.read(out, count: count)
            if let wrong = result.indices.first(where: { result[$0] != Float($0) }) {
                throw .wrongResult("lycoris_hadamard gave \(result[wrong]) at \(wrong), expected \(wrong)")
            }
            return "NVRTC compute_\(capability.major)\(capability.minor), lycoris_hadamard on \(count) elements exact"
        }
    }
}
