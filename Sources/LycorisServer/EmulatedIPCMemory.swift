#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import LycorisCUDA

/// The emulated device's stand-in for CUDA IPC (protocol/README.md §5.3), so the whole
/// device path runs in CI without a GPU: a "handle" is the name of a file the client made
/// in the server's arena directory (`lycoris-emulated-…`, ASCII, zero-padded to 64 bytes),
/// "opening" it maps the file `MAP_SHARED`, and an address is a pointer into that mapping —
/// what ``LycorisDevice``'s `EmulatedDevice` takes as a device address. Closing unmaps.
final class EmulatedIPCMemory: IPCMemory {
    static let namePrefix = "lycoris-emulated-"

    let directory: String
    /// Mapped length of each open mapping, by base address (munmap needs it).
    private var lengths: [UInt64: Int] = [:]

    init(directory: String) { self.directory = directory }

    /// The file name a handle carries, or why it carries none.
    static func fileName(_ handle: IPCHandle) throws(CUDAError) -> String {
        let bytes = handle.bytes.prefix { $0 != 0 }
        guard handle.bytes.dropFirst(bytes.count).allSatisfy({ $0 == 0 }), bytes.allSatisfy({ $0 >= 0x21 && $0 < 0x7F }) else {
            throw .invalidArgument("emulated handle \(handle) is not an ASCII file name padded with zeros")
        }
        let name = String(decoding: bytes, as: UTF8.self)
        guard name.hasPrefix(namePrefix), !name.contains("/"), name.count > namePrefix.count else {
            throw .invalidArgument("emulated handle \"\(name)\" must name a file \(namePrefix)… of the arena directory (no /)")
        }
        return name
    }

    func open(_ handle: IPCHandle) throws(CUDAError) -> IPCHandleCache<EmulatedIPCMemory>.Mapping {
        let path = directory + "/" + (try Self.fileName(handle))
        let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .invalidArgument("emulated handle: cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_size > 0 else {
            throw .invalidArgument("emulated handle: \(path) is empty or cannot be examined")
        }
        let length = Int(status.st_size)
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw .invalidArgument("emulated handle: cannot map \(path): \(String(cString: strerror(errno)))")
        }
        let address = UInt64(UInt(bitPattern: pointer))
        lengths[address] = length
        return .init(address: address, size: length)
    }

    func close(_ address: UInt64) throws(CUDAError) {
        guard let length = lengths.removeValue(forKey: address),
              let pointer = UnsafeMutableRawPointer(bitPattern: UInt(address)) else { return }
        munmap(pointer, length)
    }
}
