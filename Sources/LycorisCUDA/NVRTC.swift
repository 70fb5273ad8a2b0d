#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// NVRTC, CUDA's run-time compiler: CUDA C++ source → PTX, which the driver loads and JITs
/// for the GPU at hand. It needs no GPU, so kernels are compiled (and tested) anywhere the
/// library is (the PyPI wheel `nvidia-cuda-nvrtc`, which torch's CUDA builds install).
///
/// The functions used, declared here from NVIDIA's documented C API (no CUDA headers needed);
/// every one returns an `nvrtcResult` (0 = success):
///
///     nvrtcVersion(int *major, int *minor)
///     nvrtcGetErrorString(nvrtcResult) -> const char *
///     nvrtcCreateProgram(nvrtcProgram *, const char *source, const char *name,
///                        int headerCount, const char *const *headers, const char *const *includeNames)
///     nvrtcCompileProgram(nvrtcProgram, int optionCount, const char *const *options)
///     nvrtcGetProgramLogSize(nvrtcProgram, size_t *) / nvrtcGetProgramLog(nvrtcProgram, char *)
///     nvrtcGetPTXSize(nvrtcProgram, size_t *) / nvrtcGetPTX(nvrtcProgram, char *)
///     nvrtcDestroyProgram(nvrtcProgram *)
public final class NVRTC: @unchecked Sendable {
    public static let libraryNames = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]

    public let library: DynamicLibrary
    /// (major, minor), e.g. (13, 2).
    public let version: (major: Int, minor: Int)

    typealias Program = OpaquePointer?
    private let errorString: @convention(c) (Int32) -> UnsafePointer<CChar>?
    private let createProgram: @convention(c) (
        UnsafeMutablePointer<Program>, UnsafePointer<CChar>, UnsafePointer<CChar>, Int32,
        UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    private let compileProgram: @convention(c) (Program, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    private let logSize: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Int32
    private let log: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Int32
    private let ptxSize: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Int32
    private let ptx: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Int32
    private let destroyProgram: @convention(c) (UnsafeMutablePointer<Program>) -> Int32

    /// Loads NVRTC from `directories`, then the system's search.
    public init(directories: [String]) throws(CUDAError) {
        library = try DynamicLibrary.load("libnvrtc (NVRTC)", names: Self.libraryNames, directories: directories)
        let versionCall = try library.function("nvrtcVersion",
            as: (@convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Int32).self)
        errorString = try library.function("nvrtcGetErrorString", as: type(of: errorString))
        createProgram = try library.function("nvrtcCreateProgram", as: type(of: createProgram))
        compileProgram = try library.function("nvrtcCompileProgram", as: type(of: compileProgram))
        logSize = try library.function("nvrtcGetProgramLogSize", as: type(of: logSize))
        log = try library.function("nvrtcGetProgramLog", as: type(of: log))
        ptxSize = try library.function("nvrtcGetPTXSize", as: type(of: ptxSize))
        ptx = try library.function("nvrtcGetPTX", as: type(of: ptx))
        destroyProgram = try library.function("nvrtcDestroyProgram", as: type(of: destroyProgram))
        var major: Int32 = 0, minor: Int32 = 0
        let status = versionCall(&major, &minor)
        guard status == 0 else {
            throw .callFailed(function: "nvrtcVersion", status: status, message: "NVRTC status \(status)")
        }
        version = (Int(major), Int(minor))
        // NVRTC opens libnvrtc-builtins.so.MAJOR.MINOR by bare name through its own RUNPATH
        // ($ORIGIN); a dlopen interceptor (AddressSanitizer's) loses that, and compiling then
        // fails. The builtins beside the loaded NVRTC are loaded first, by path.
        if let slash = library.path.lastIndex(of: "/") {
            DynamicLibrary.preload(String(library.path[..<slash]) + "/libnvrtc-builtins.so.\(major).\(minor)")
        }
    }

    /// The PTX of `source` compiled with `options` (e.g. `--gpu-architecture=compute_90`);
    /// a source NVRTC rejects throws ``CUDAError/compilationFailed(program:log:)`` with the log.
    public func compile(_ source: String, name: String, options: [String]) throws(CUDAError) -> String {
        var program: Program = nil
        try check("nvrtcCreateProgram", createProgram(&program, source, name, 0, nil, nil))
        defer { _ = destroyProgram(&program) }
        let cOptions = options.map { strdup($0) }
        defer { cOptions.forEach { free($0) } }
        let status = cOptions.map { UnsafePointer($0) }.withUnsafeBufferPointer {
            compileProgram(program, Int32(options.count), $0.baseAddress)
        }
        if status != 0 {
            throw .compilationFailed(program: name, log: programText(program, size: logSize, read: log))
        }
        return programText(program, size: ptxSize, read: ptx)
    }

    private func programText(_ program: Program, size: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Int32,
                             read: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Int32) -> String {
        var count = 0
        guard size(program, &count) == 0, count > 0 else { return "" }
        var buffer = [CChar](repeating: 0, count: count + 1)
        guard read(program, &buffer) == 0 else { return "" }
        return cString(buffer)
    }

    private func check(_ function: String, _ status: Int32) throws(CUDAError) {
        guard status != 0 else { return }
        let message = errorString(status).map { String(cString: $0) } ?? "NVRTC status \(status)"
        throw .callFailed(function: function, status: status, message: message)
    }
}
