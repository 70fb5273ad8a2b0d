import LycorisCUDA
import LycorisDevice
import LycorisRPC

/// `initialize {cuda: {library_dirs}}`: the CUDA probe and its report under
/// `capabilities.cuda`; `network.create {device}`: the device choice against it
/// (protocol/README.md §9; computing there: Service+Device.swift).
extension LycorisService {
    /// A `device` of `network.create`/`network.bind` other than `emulated`, checked against
    /// the probe; -32009 when the server cannot compute there.
    func checkedDevice(_ text: String) throws -> ComputeDevice {
        let status = cudaBackend?.status
        switch Result(catching: { () throws(DeviceError) in try ComputeDevice(parsing: text).checked(against: status) }) {
        case let .success(device): return device
        case let .failure(error): throw RPCError.device(error.message, path: "device")
        }
    }

    /// The CUDA backend's math for `device` (made on first use and kept); -32009 when it
    /// cannot start there.
    func cudaMath(_ device: ComputeDevice) throws -> DeviceAdapterMath {
        guard let cudaBackend else { throw RPCError.device("\(device) needs CUDA, which was not probed", path: "device") }
        switch Result(catching: { () throws(DeviceError) in try cudaBackend.math(for: device) }) {
        case let .success(math): return math
        case let .failure(error): throw RPCError.device(error.message, path: "device")
        }
    }

    /// Probes CUDA with the client's library directories (once per `initialize` that asks).
    func probeCUDA(_ p: Params) throws -> JSONValue {
        let request = try p.object("cuda")
        let directories = request.has("library_dirs") ? try request.strings("library_dirs") : []
        let environment = CUDAEnvironment(directories: directories)
        cuda = environment
        cudaBackend = CUDABackend(environment: environment)
        return Self.report(environment)
    }

    static func report(_ environment: CUDAEnvironment) -> JSONValue {
        var report: JSONObject = [:]
        if let reason = environment.unavailableReason {
            report["state"] = "unavailable"
            report["reason"] = .string(reason)
        } else {
            report["state"] = "available"
        }
        report["library_dirs"] = .array(environment.directories.map { .string($0) })
        if case let .success(driver) = environment.driver {
            report["driver"] = [
                "path": .string(driver.library.path),
                "cuda_version": .string("\(driver.version.major).\(driver.version.minor)"),
            ]
            report["devices"] = .array(driver.devices.map { device in
                [
                    "index": .integer(Int64(device.index)),
                    "name": .string(device.name),
                    "memory": .integer(Int64(device.memory)),
                    "compute_capability": .string("\(device.computeCapability.major).\(device.computeCapability.minor)"),
                ]
            })
        }
        if case let .success(cublas) = environment.cublas {
            report["cublas"] = [
                "path": .string(cublas.library.path),
                "version": .string("\(cublas.version.major).\(cublas.version.minor).\(cublas.version.patch)"),
            ]
        }
        if case let .success(nvrtc) = environment.nvrtc {
            report["nvrtc"] = [
                "path": .string(nvrtc.library.path),
                "version": .string("\(nvrtc.version.major).\(nvrtc.version.minor)"),
            ]
            if environment.unavailableReason == nil, case let .success(driver) = environment.driver,
               case let .success(cublas) = environment.cublas {
                switch CUDAKernelCheck.run(driver: driver, nvrtc: nvrtc, cublas: cublas, device: 0) {
                case let .success(detail): report["kernels"] = ["state": "passed", "detail": .string(detail)]
                case let .failure(error): report["kernels"] = ["state": "failed", "error": .string(error.description)]
                }
            }
        }
        return .object(report)
    }
}
