import LycorisCUDA
import LycorisTestSupport
import Testing

/// NVRTC and cuBLAS from torch's PyPI wheels, on a machine without a GPU: they load, report
/// their versions, and NVRTC compiles CUDA C to PTX for compute capability 9.0 (H100).
@Suite struct NVRTCTests {
    @Test func nvrtcLoadsFromTheWheelFoldersAndReportsItsVersion() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let nvrtc = try NVRTC(directories: TorchLibraries.directories)
        #expect(TorchLibraries.directories.contains { nvrtc.library.path.hasPrefix($0 + "/") })
        #expect(nvrtc.version.major >= 12)
    }

    @Test func nvrtcCompilesAKernelToPTXForComputeCapability90() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let nvrtc = try NVRTC(directories: TorchLibraries.directories)
        let source = """
            extern "C" __global__ void lycoris_scale(float *x, float s, unsigned long long n) {
                unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
                if (i < n) x[i] *= s;
            }
            """
        let ptx = try nvrtc.compile(source, name: "scale.cu", options: ["--gpu-architecture=compute_90"])
        #expect(ptx.contains(".target sm_90"))
        #expect(ptx.contains(".entry lycoris_scale("))
    }

    @Test func aSourceNVRTCRejectsThrowsWithTheCompilerLog() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let nvrtc = try NVRTC(directories: TorchLibraries.directories)
        let error = #expect(throws: CUDAError.self) {
            _ = try nvrtc.compile("__global__ void broken() { undeclared_name = 1; }", name: "broken.cu",
                                  options: ["--gpu-architecture=compute_90"])
        }
        guard case let .compilationFailed(program, log)? = error else {
            Issue.record("expected compilationFailed, got \(String(describing: error))")
            return
        }
        #expect(program == "broken.cu")
        #expect(log.contains("undeclared_name"))
    }

    @Test func cublasLoadsAndReportsItsVersionWithoutAGPU() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let cublas = try CUBLAS(directories: TorchLibraries.directories)
        #expect(cublas.version.major >= 12)
    }

    @Test func aCUBLASHandleWithoutADriverFailsWithCUBLASsStatus() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let environment = CUDAEnvironment(directories: TorchLibraries.directories)
        let cublas = try environment.cublas.get()
        if case .failure = environment.driver {  // no GPU driver: cuBLAS cannot initialise
            #expect(throws: CUDAError.callFailed(function: "cublasCreate_v2", status: 1, message: "cublasStatus 1")) {
                _ = try CUBLASHandle(cublas)
            }
        } else {
            _ = try CUBLASHandle(cublas)
        }
    }

    @Test func theEnvironmentIsUnavailableOnlyForTheDriverWhenTheLibrariesLoad() throws {
        try #require(!TorchLibraries.directories.isEmpty, Comment(rawValue: TorchLibraries.missing))
        let environment = CUDAEnvironment(directories: TorchLibraries.directories)
        #expect((try? environment.cublas.get()) != nil)
        #expect((try? environment.nvrtc.get()) != nil)
        switch environment.driver {
        case let .failure(error):  // no GPU driver on this machine
            #expect(environment.unavailableReason == error.description)
            #expect(error.description.hasPrefix("libcuda (the CUDA driver) not found: looked for libcuda.so.1"))
        case let .success(driver):
            #expect(environment.unavailableReason == (driver.devices.isEmpty ? "the CUDA driver lists no device" : nil))
        }
    }
}
