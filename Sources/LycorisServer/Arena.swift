#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import LycorisCore
import LycorisRPC

/// The shared-memory arena: one file in a memory-backed directory (default `/dev/shm`),
/// mapped `MAP_SHARED` by the server and by the client. The server creates it (mode 0600,
/// a fresh unique name), is its only owner, and unlinks it when the arena is released, when
/// the client closes stdin, or at `shutdown`. The client maps the returned `path` and
/// places tensors at byte offsets it chooses; every descriptor is bounds-checked here.
final class Arena {
    let path: String
    private(set) var size: Int
    private var fd: Int32
    private var base: UnsafeMutableRawPointer

    /// Largest arena (bytes): 64 GiB.
    static let maximumSize = 64 << 30

    private nonisolated(unsafe) static var counter = 0

    init(directory: String, size: Int) throws {
        guard size > 0 && size <= Self.maximumSize else {
            throw RPCError.arena("size must be between 1 byte and \(Self.maximumSize) bytes, got \(size)")
        }
        // pid, counter and a random tag: a file a killed server left behind (its pid since
        // reused) cannot collide; O_EXCL still guarantees a fresh file.
        var path = ""
        var fd: Int32 = -1
        for _ in 0..<8 {
            Self.counter += 1
            let tag = String(UInt32.random(in: .min ... .max), radix: 16)
            path = "\(directory)/lycoris-arena-\(getpid())-\(Self.counter)-\(tag)"
            fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd >= 0 || errno != EEXIST { break }
        }
        guard fd >= 0 else { throw RPCError.arena("cannot create \(path): \(String(cString: strerror(errno)))", path: path) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            unlink(path)
            throw RPCError.arena("cannot size \(path) to \(size) bytes: \(reason)", path: path)
        }
        guard let base = Self.map(fd: fd, size: size) else {
            let reason = String(cString: strerror(errno))
            close(fd)
            unlink(path)
            throw RPCError.arena("cannot map \(path): \(reason)", path: path)
        }
        self.path = path
        self.size = size
        self.fd = fd
        self.base = base
        ArenaCleanup.register(path)
    }

    private static func map(fd: Int32, size: Int) -> UnsafeMutableRawPointer? {
        let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        return pointer == MAP_FAILED ? nil : pointer
    }

    /// Grows (or shrinks) the arena; the client must map it again afterwards.
    func resize(to newSize: Int) throws {
        guard newSize > 0 && newSize <= Self.maximumSize else {
            throw RPCError.arena("size must be between 1 byte and \(Self.maximumSize) bytes, got \(newSize)", path: path)
        }
        guard ftruncate(fd, off_t(newSize)) == 0 else {
            throw RPCError.arena("cannot resize to \(newSize) bytes: \(String(cString: strerror(errno)))", path: path)
        }
        guard let newBase = Self.map(fd: fd, size: newSize) else {
            throw RPCError.arena("cannot map \(newSize) bytes: \(String(cString: strerror(errno)))", path: path)
        }
        munmap(base, size)
        base = newBase
        size = newSize
    }

    deinit {
        ArenaCleanup.unregister()
        munmap(base, size)
        close(fd)
        unlink(path)
    }

    /// The bytes of a tensor of `count` elements of `dtype` at `offset`, after checking that
    /// they lie inside the arena and are aligned to the element size.
    func bytes(offset: Int, count: Int, dtype: DType, path parameter: String) throws -> UnsafeMutableRawBufferPointer {
        let (length, overflow) = count.multipliedReportingOverflow(by: dtype.byteSize)
        guard offset >= 0, !overflow else {
            throw RPCError.arena("\(parameter): offset \(offset) or size is invalid", path: parameter)
        }
        guard offset % dtype.byteSize == 0 else {
            throw RPCError.arena("\(parameter): offset \(offset) is not aligned to \(dtype.byteSize) bytes (\(dtype.rawValue))", path: parameter)
        }
        let (end, endOverflow) = offset.addingReportingOverflow(length)
        guard !endOverflow, end <= size else {
            throw RPCError.arena("\(parameter): bytes \(offset)..<\(offset &+ length) lie outside the arena of \(size) bytes", path: parameter)
        }
        return UnsafeMutableRawBufferPointer(start: base + offset, count: length)
    }
}
