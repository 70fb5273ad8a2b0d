import LycorisCUDA
import Testing

/// The IPC handle cache with a fake device: each handle opens once however many tensors it
/// holds, offsets are bounds-checked against the allocation, releases close exactly what was
/// opened, and a failing open or close surfaces with the device's message.
@Suite struct IPCHandleCacheTests {
    /// A device whose allocations are listed up front; it records every open and close.
    final class FakeDevice: IPCMemory {
        var allocations: [IPCHandle: IPCHandleCache<FakeDevice>.Mapping]
        var opened: [IPCHandle] = []
        var closed: [UInt64] = []
        var failClose = false

        init(_ allocations: [IPCHandle: IPCHandleCache<FakeDevice>.Mapping]) { self.allocations = allocations }

        func open(_ handle: IPCHandle) throws(CUDAError) -> IPCHandleCache<FakeDevice>.Mapping {
            opened.append(handle)
            guard let mapping = allocations[handle] else {
                throw .callFailed(function: "cuIpcOpenMemHandle", status: 1, message: "invalid argument")
            }
            return mapping
        }

        func close(_ address: UInt64) throws(CUDAError) {
            closed.append(address)
            if failClose { throw .callFailed(function: "cuIpcCloseMemHandle", status: 201, message: "invalid context") }
        }
    }

    static func handle(_ tag: UInt8) throws -> IPCHandle { try IPCHandle(bytes: [tag] + [UInt8](repeating: 0xab, count: 63)) }

    @Test func eachHandleOpensOnceForAllItsTensors() throws {
        let (a, b) = (try Self.handle(1), try Self.handle(2))
        let device = FakeDevice([a: .init(address: 0x7000_0000, size: 1 << 20), b: .init(address: 0x9000_0000, size: 4096)])
        let cache = IPCHandleCache(memory: device)
        #expect(try cache.address(of: a, offset: 0, bytes: 512) == 0x7000_0000)
        #expect(try cache.address(of: a, offset: 512, bytes: 1024) == 0x7000_0200)
        #expect(try cache.address(of: b, offset: 4000, bytes: 96) == 0x9000_0FA0)
        #expect(try cache.address(of: a, offset: (1 << 20) - 4, bytes: 4) == 0x7000_0000 + (1 << 20) - 4)
        #expect(device.opened == [a, b])
        #expect(cache.openCount == 2)
    }

    @Test func aRangeOutsideTheAllocationIsRefusedAndTheMappingKept() throws {
        let a = try Self.handle(1)
        let device = FakeDevice([a: .init(address: 0x1000, size: 256)])
        let cache = IPCHandleCache(memory: device)
        let error = #expect(throws: CUDAError.self) { try cache.address(of: a, offset: 200, bytes: 57) }
        #expect(error == .invalidArgument("57 bytes at offset 200 are outside the 256-byte allocation of handle 01ababababababab…"))
        #expect(throws: CUDAError.self) { try cache.address(of: a, offset: -4, bytes: 4) }
        #expect(try cache.address(of: a, offset: 200, bytes: 56) == 0x1000 + 200)
        #expect(device.opened == [a])
    }

    @Test func aHandleTheDeviceRejectsIsNotCached() throws {
        let unknown = try Self.handle(9)
        let device = FakeDevice([:])
        let cache = IPCHandleCache(memory: device)
        #expect(throws: CUDAError.callFailed(function: "cuIpcOpenMemHandle", status: 1, message: "invalid argument")) {
            try cache.address(of: unknown, offset: 0, bytes: 4)
        }
        #expect(cache.openCount == 0)
        _ = try? cache.address(of: unknown, offset: 0, bytes: 4)
        #expect(device.opened == [unknown, unknown], "a failed open is retried, not remembered")
    }

    @Test func releaseClosesWhatWasOpenedAndReopensOnNextUse() throws {
        let (a, b) = (try Self.handle(1), try Self.handle(2))
        let device = FakeDevice([a: .init(address: 0x1000, size: 64), b: .init(address: 0x2000, size: 64)])
        let cache = IPCHandleCache(memory: device)
        _ = try cache.address(of: a, offset: 0, bytes: 4)
        _ = try cache.address(of: b, offset: 0, bytes: 4)
        try cache.release(a)
        try cache.release(a)  // not open any more: nothing to close
        #expect(device.closed == [0x1000])
        _ = try cache.address(of: a, offset: 0, bytes: 4)
        #expect(device.opened == [a, b, a])
        device.failClose = true
        #expect(throws: CUDAError.callFailed(function: "cuIpcCloseMemHandle", status: 201, message: "invalid context")) {
            try cache.releaseAll()
        }
        #expect(Set(device.closed) == [0x1000, 0x2000] && device.closed.count == 3, "every mapping is closed once")
        #expect(cache.openCount == 0)
    }

    @Test func aHandleHas64Bytes() {
        #expect(throws: CUDAError.invalidArgument("a CUDA IPC handle has 64 bytes, not 63")) {
            try IPCHandle(bytes: [UInt8](repeating: 0, count: 63))
        }
    }
}
