import LycorisCUDA
import Testing

/// `network.create`'s `device`: parsing, and the choice against CUDA states made with a fake
/// device (no GPU is needed to see each refusal and the one acceptance).
@Suite struct DeviceSelectionTests {
    static let fakeH100 = CUDADriver.Device(index: 0, name: "Fake H100", memory: 80 << 30, computeCapability: (9, 0))

    @Test(arguments: [("cpu", ComputeDevice.cpu), ("cuda", .cuda(0)), ("cuda:0", .cuda(0)), ("cuda:3", .cuda(3))])
    func devicesParse(text: String, device: ComputeDevice) throws {
        #expect(try ComputeDevice(parsing: text) == device)
        #expect(device.description == (text == "cuda" ? "cuda:0" : text))
    }

    @Test(arguments: ["gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "CPU", ""])
    func otherTextIsNotADevice(text: String) {
        #expect(throws: DeviceError("\"\(text)\" is not a device: use \"cpu\", \"cuda\" or \"cuda:N\" (N = 0, 1, …)")) {
            try ComputeDevice(parsing: text)
        }
    }

    @Test func cpuNeedsNothing() throws {
        #expect(try ComputeDevice.cpu.checked(against: nil) == .cpu)
    }

    @Test func cudaIsRefusedWithTheFirstReasonThatApplies() {
        #expect(throws: DeviceError("cuda:0 needs CUDA, which was not probed: call initialize with cuda {library_dirs}")) {
            try ComputeDevice.cuda(0).checked(against: nil)
        }
        let unavailable = CUDAStatus(devices: [], unavailableReason: "libcuda (the CUDA driver) not found: …",
                                     hasComputeBackend: true)
        #expect(throws: DeviceError("cuda:0: CUDA is unavailable: libcuda (the CUDA driver) not found: …")) {
            try ComputeDevice.cuda(0).checked(against: unavailable)
        }
        let one = CUDAStatus(devices: [Self.fakeH100], unavailableReason: nil, hasComputeBackend: true)
        #expect(throws: DeviceError("cuda:1: the CUDA driver lists devices cuda:0…cuda:0")) {
            try ComputeDevice.cuda(1).checked(against: one)
        }
        let noBackend = CUDAStatus(devices: [Self.fakeH100], unavailableReason: nil, hasComputeBackend: false)
        #expect(throws: DeviceError("cuda:0 (Fake H100): this server has no CUDA compute backend yet; use \"cpu\"")) {
            try ComputeDevice.cuda(0).checked(against: noBackend)
        }
    }

    @Test func anAvailableDeviceWithABackendIsChosen() throws {
        let two = CUDAStatus(devices: [Self.fakeH100, Self.fakeH100], unavailableReason: nil, hasComputeBackend: true)
        #expect(try ComputeDevice.cuda(1).checked(against: two) == .cuda(1))
    }
}
