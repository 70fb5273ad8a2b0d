import LycorisCUDA

/// The server's CUDA compute backend over a probed ``CUDAEnvironment``: what device selection
/// checks (``status``: the backend exists, so `cuda:N` is accepted wherever CUDA is available
/// and lists device N), and each device's ``DeviceAdapterMath``, made on first use — NVRTC
/// compiles the kernels, the driver loads them, cuBLAS gets a stream — and kept, with its
/// workspace, for every later network on that device. A device whose runtime cannot be
/// created is refused with the reason, every time (the failure is kept too).
///
/// The server makes one per `initialize {cuda}` probe. NOT YET RUN ON A GPU: without a driver
/// (here) every device is refused with the driver's not-found error (tested).
public final class CUDABackend: @unchecked Sendable {
    public let environment: CUDAEnvironment
    private let makeRuntime: (Int) throws -> DeviceRuntime
    private var made: [Int: Result<DeviceAdapterMath, DeviceError>] = [:]

    public convenience init(environment: CUDAEnvironment) {
        self.init(environment: environment) { device in try CUDADevice(environment: environment, device: device) }
    }

    /// A backend whose runtimes come from `makeRuntime` (tests pass a fake or an ``EmulatedDevice``).
    public init(environment: CUDAEnvironment, makeRuntime: @escaping (Int) throws -> DeviceRuntime) {
        self.environment = environment
        self.makeRuntime = makeRuntime
    }

    /// Device selection's view: the environment's devices and unavailability, with a backend.
    public var status: CUDAStatus {
        CUDAStatus(devices: (try? environment.driver.get())?.devices ?? [], unavailableReason: environment.unavailableReason,
                   hasComputeBackend: true)
    }

    /// The math of `device` (`cuda:N` checked against ``status``), made once.
    public func math(for device: ComputeDevice) throws(DeviceError) -> DeviceAdapterMath {
        try math(for: device, status: status)
    }

    /// ``math(for:)`` checked against `status` (tests give a fake device list).
    func math(for device: ComputeDevice, status: CUDAStatus) throws(DeviceError) -> DeviceAdapterMath {
        guard case let .cuda(index) = try device.checked(against: status) else {
            throw DeviceError("\(device) is not a CUDA device")
        }
        if made[index] == nil {
            made[index] = Result { () throws(DeviceError) -> DeviceAdapterMath in
                do {
                    return DeviceAdapterMath(runtime: try makeRuntime(index))
                } catch {
                    throw DeviceError("\(device): the CUDA backend could not start: \(error)")
                }
            }
        }
        return try made[index]!.get()
    }
}
