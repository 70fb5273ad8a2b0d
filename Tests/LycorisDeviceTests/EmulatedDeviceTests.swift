import LycorisCore
import LycorisDevice
import Testing

@Suite struct EmulatedDeviceTests {
    @Test func memoryRoundTrips() throws {
        let device = EmulatedDevice()
        let address = try device.allocate(5)
        try device.write([1, 2, 3, 4, 5], to: address)
        #expect(try device.read(address, count: 5) == [1, 2, 3, 4, 5])
        try device.free(address)
        #expect(device.liveAllocations.isEmpty)
    }
}
