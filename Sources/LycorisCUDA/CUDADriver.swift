/// The CUDA driver API (`libcuda.so.1`), which comes with the GPU driver and is in no wheel:
/// its absence is how a machine without a GPU shows. Only the calls that describe the
/// devices are declared so far (from NVIDIA's documented C API; `CUresult` 0 = success):
///
///     cuInit(unsigned flags)
///     cuDriverGetVersion(int *)                  1000 × major + 10 × minor, e.g. 13000
///     cuDeviceGetCount(int *) / cuDeviceGet(CUdevice *, int ordinal)
///     cuDeviceGetName(char *, int length, CUdevice)
///     cuDeviceTotalMem_v2(size_t *, CUdevice)
///     cuDeviceGetAttribute(int *, CUdevice_attribute, CUdevice)   75/76: compute capability
///     cuGetErrorString(CUresult, const char **)
public final class CUDADriver: @unchecked Sendable {
    public static let libraryNames = ["libcuda.so.1", "libcuda.so"]

    /// One GPU as the driver describes it.
    public struct Device: Sendable, Equatable {
        public let index: Int
        public let name: String
        /// Total memory, bytes.
        public let memory: Int
        public let computeCapability: (major: Int, minor: Int)

        public init(index: Int, name: String, memory: Int, computeCapability: (major: Int, minor: Int)) {
            self.index = index
            self.name = name
            self.memory = memory
            self.computeCapability = computeCapability
        }

        public static func == (a: Device, b: Device) -> Bool {
            a.index == b.index && a.name == b.name && a.memory == b.memory
                && a.computeCapability == b.computeCapability
        }
    }

    public let library: DynamicLibrary
    /// (major, minor) of the CUDA version the driver supports, e.g. (13, 0).
    public let version: (major: Int, minor: Int)
    public let devices: [Device]

    typealias ErrorString = @convention(c) (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Int32
    let errorString: ErrorString

    /// Loads the driver, initialises it and lists the devices.
    public init(directories: [String]) throws(CUDAError) {
        library = try DynamicLibrary.load("libcuda (the CUDA driver)", names: Self.libraryNames, directories: directories)
        let errorString = try library.function("cuGetErrorString", as: ErrorString.self)
        self.errorString = errorString
        func check(_ function: String, _ status: Int32) throws(CUDAError) {
            try Self.check(function, status, errorString)
        }
        let initialize = try library.function("cuInit", as: (@convention(c) (UInt32) -> Int32).self)
        let driverVersion = try library.function("cuDriverGetVersion",
            as: (@convention(c) (UnsafeMutablePointer<Int32>) -> Int32).self)
        let deviceCount = try library.function("cuDeviceGetCount",
            as: (@convention(c) (UnsafeMutablePointer<Int32>) -> Int32).self)
        let deviceGet = try library.function("cuDeviceGet",
            as: (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32).self)
        let deviceName = try library.function("cuDeviceGetName",
            as: (@convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Int32).self)
        let totalMemory = try library.function("cuDeviceTotalMem_v2",
            as: (@convention(c) (UnsafeMutablePointer<Int>, Int32) -> Int32).self)
        let attribute = try library.function("cuDeviceGetAttribute",
            as: (@convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Int32).self)

        var value: Int32 = 0
        try check("cuInit", initialize(0))
        try check("cuDriverGetVersion", driverVersion(&value))
        version = (Int(value) / 1000, Int(value) % 1000 / 10)
        try check("cuDeviceGetCount", deviceCount(&value))
        var devices: [Device] = []
        for ordinal in 0..<value {
            var device: Int32 = 0, major: Int32 = 0, minor: Int32 = 0, memory = 0
            var name = [CChar](repeating: 0, count: 256)
            try check("cuDeviceGet", deviceGet(&device, ordinal))
            try check("cuDeviceGetName", deviceName(&name, Int32(name.count - 1), device))
            try check("cuDeviceTotalMem_v2", totalMemory(&memory, device))
            try check("cuDeviceGetAttribute", attribute(&major, 75, device))
            try check("cuDeviceGetAttribute", attribute(&minor, 76, device))
            devices.append(Device(index: Int(ordinal), name: cString(name), memory: memory,
                                  computeCapability: (Int(major), Int(minor))))
        }
        self.devices = devices
    }

    /// Throws ``CUDAError/callFailed(function:status:message:)`` with the driver's text for a
    /// non-zero `CUresult`.
    func check(_ function: String, _ status: Int32) throws(CUDAError) {
        try Self.check(function, status, errorString)
    }

    private static func check(_ function: String, _ status: Int32, _ errorString: ErrorString) throws(CUDAError) {
        guard status != 0 else { return }
        var text: UnsafePointer<CChar>?
        let message = errorString(status, &text) == 0 ? text.map { String(cString: $0) } : nil
        throw .callFailed(function: function, status: status, message: message ?? "CUresult \(status)")
    }
}
