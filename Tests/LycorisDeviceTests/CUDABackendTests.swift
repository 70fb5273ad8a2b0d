import Foundation
import LycorisCUDA
@testable import LycorisDevice
import Testing

/// The CUDA runtime's refusal paths without a GPU, and the backend's choice of a device with a
/// fake one.
@Suite struct CUDABackendTests {
    static let fakeH100 = CUDADriver.Device(index: 0, name: "Fake H100", memory: 80 << 30, computeCapability: (9, 0))

    /// Here the driver is missing: a CUDADevice is refused with the driver's own not-found
    /// error, and the backend refuses `cuda:0` with it. (On a GPU host both succeed.)
    @Test func withoutADriverTheRuntimeAndTheBackendNameTheMissingDriver() throws {
        let environment = CUDAEnvironment(directories: ["/nonexistent"])
        guard case let .failure(missing) = environment.driver else {
            // A machine with a driver: the runtime starts (the GPU path's own check is DeviceSelfCheck).
            _ = try CUDADevice(environment: environment, device: 0)
            return
        }
        #expect(missing.description.hasPrefix("libcuda (the CUDA driver) not found: looked for libcuda.so.1, libcuda.so in /nonexistent"))
        #expect(throws: missing) { try CUDADevice(environment: environment, device: 0) }
        let backend = CUDABackend(environment: environment)
        #expect(backend.status.hasComputeBackend)
        #expect(backend.status.devices.isEmpty)
        let refusal = #expect(throws: DeviceError.self) { try backend.math(for: .cuda(0)) }
        #expect(refusal?.message.hasPrefix("cuda:0: CUDA is unavailable: libcuda (the CUDA driver) not found") == true)
    }

    /// With a fake runtime factory: a CUDA device is made once and kept; a factory failure is
    /// the refusal, kept too; `cpu` is not a CUDA device.
    @Test func aDeviceIsMadeOnceAndAFailureIsKept() throws {
        var calls: [Int] = []
        let backend = CUDABackend(environment: CUDAEnvironment(directories: [])) { index in
            calls.append(index)
            if index == 1 { throw CUDAError.callFailed(function: "cuCtxSetCurrent", status: 101, message: "invalid device ordinal") }
            return EmulatedDevice()
        }
        let status = CUDAStatus(devices: [Self.fakeH100, Self.fakeH100], unavailableReason: nil, hasComputeBackend: true)
        let first = try backend.math(for: .cuda(0), status: status)
        #expect(try backend.math(for: .cuda(0), status: status) === first)
        for _ in 0..<2 {
            #expect(throws: DeviceError("cuda:1: the CUDA backend could not start: cuCtxSetCurrent failed with status 101: invalid device ordinal")) {
                try backend.math(for: .cuda(1), status: status)
            }
        }
        #expect(calls == [0, 1])
        #expect(throws: DeviceError("cpu is not a CUDA device")) { try backend.math(for: .cpu, status: status) }
    }
}
