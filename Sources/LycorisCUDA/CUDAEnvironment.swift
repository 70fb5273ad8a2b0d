/// What this process can use of CUDA: the driver and its devices, cuBLAS and NVRTC, each
/// loaded from the client's `directories` then the system's, or the error that says why not.
/// CUDA is *available* when all three load and the driver lists at least one device.
///
/// Nothing here has run on a GPU yet: on machines without one the driver is missing and the
/// state is `unavailable`; cuBLAS and NVRTC load from torch's wheels without a GPU.
public struct CUDAEnvironment: @unchecked Sendable {
    public let directories: [String]
    public let driver: Result<CUDADriver, CUDAError>
    public let cublas: Result<CUBLAS, CUDAError>
    public let nvrtc: Result<NVRTC, CUDAError>

    public init(directories: [String]) {
        self.directories = directories
        driver = Result { () throws(CUDAError) in try CUDADriver(directories: directories) }
        cublas = Result { () throws(CUDAError) in try CUBLAS(directories: directories) }
        nvrtc = Result { () throws(CUDAError) in try NVRTC(directories: directories) }
    }

    /// Why CUDA cannot be used (every reason, joined), or nil when it can.
    public var unavailableReason: String? {
        var reasons: [String] = []
        switch driver {
        case let .failure(error): reasons.append(error.description)
        case let .success(driver) where driver.devices.isEmpty: reasons.append("the CUDA driver lists no device")
        case .success: break
        }
        if case let .failure(error) = cublas { reasons.append(error.description) }
        if case let .failure(error) = nvrtc { reasons.append(error.description) }
        return reasons.isEmpty ? nil : reasons.joined(separator: "; ")
    }
}
