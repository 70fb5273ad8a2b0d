/// Where a network computes — `cpu`, or `cuda:N` (the N-th device the CUDA driver lists) —
/// and the choice of one against what the server has (protocol/README.md, `network.create`
/// `device`).
///
/// Selection of `cuda:N` succeeds only when CUDA was probed (`initialize {cuda}`), is
/// available, lists device N, and the server has a CUDA compute backend; otherwise it is
/// refused with the first of those reasons that applies. ``CUDAStatus`` is a plain value so
/// tests choose each case with a fake device. The backend is LycorisDevice's `CUDABackend`
/// (its `status` has the backend); ``CUDAStatus/init(_:)`` is the view without it.
public enum ComputeDevice: Equatable, Sendable, CustomStringConvertible {
    case cpu
    case cuda(Int)

    /// `cpu`, `cuda` (device 0) or `cuda:N`, N a decimal index.
    public init(parsing text: String) throws(DeviceError) {
        if text == "cpu" {
            self = .cpu
        } else if text == "cuda" {
            self = .cuda(0)
        } else if text.hasPrefix("cuda:"), let index = Int(text.dropFirst(5)), index >= 0, !text.dropFirst(5).contains("+") {
            self = .cuda(index)
        } else {
            throw DeviceError("\"\(text)\" is not a device: use \"cpu\", \"cuda\" or \"cuda:N\" (N = 0, 1, …)")
        }
    }

    public var description: String {
        switch self {
        case .cpu: "cpu"
        case let .cuda(index): "cuda:\(index)"
        }
    }
}

/// Why a device cannot be used; the message is the whole explanation.
public struct DeviceError: Error, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What device selection needs to know of CUDA.
public struct CUDAStatus: Sendable, Equatable {
    /// The devices the driver lists (empty when unavailable).
    public var devices: [CUDADriver.Device]
    /// Why CUDA cannot be used, or nil (``CUDAEnvironment/unavailableReason``).
    public var unavailableReason: String?
    /// Whether this server can compute on CUDA at all (false: no device backend is built in).
    public var hasComputeBackend: Bool

    public init(devices: [CUDADriver.Device], unavailableReason: String?, hasComputeBackend: Bool) {
        self.devices = devices
        self.unavailableReason = unavailableReason
        self.hasComputeBackend = hasComputeBackend
    }

    /// A probed environment seen by a server without the device backend (LycorisDevice's
    /// `CUDABackend.status` is the same with `hasComputeBackend` true).
    public init(_ environment: CUDAEnvironment) {
        self.init(devices: (try? environment.driver.get())?.devices ?? [],
                  unavailableReason: environment.unavailableReason, hasComputeBackend: false)
    }
}

extension ComputeDevice {
    /// `self` if the server can compute there; `cuda` is nil when `initialize` did not probe CUDA.
    public func checked(against cuda: CUDAStatus?) throws(DeviceError) -> ComputeDevice {
        guard case let .cuda(index) = self else { return self }
        guard let cuda else {
            throw DeviceError("\(self) needs CUDA, which was not probed: call initialize with cuda {library_dirs}")
        }
        if let reason = cuda.unavailableReason { throw DeviceError("\(self): CUDA is unavailable: \(reason)") }
        guard index < cuda.devices.count else {
            let listed = cuda.devices.isEmpty ? "no device" : "devices cuda:0…cuda:\(cuda.devices.count - 1)"
            throw DeviceError("\(self): the CUDA driver lists \(listed)")
        }
        guard cuda.hasComputeBackend else {
            throw DeviceError("\(self) (\(cuda.devices[index].name)): this server has no CUDA compute backend yet; use \"cpu\"")
        }
        return self
    }
}
