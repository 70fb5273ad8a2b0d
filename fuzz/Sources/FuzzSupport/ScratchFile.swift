#if canImport(Glibc)
import Glibc
#endif

/// One unlinked file in `/dev/shm` that each fuzz input is written into, reachable by path as
/// `/proc/self/fd/N` (so readers that take a path, and `mmap`, see exactly the input) and by
/// descriptor. Nothing is left on disk, even when the fuzzer stops at a crash.
public final class ScratchFile {
    /// The open descriptor (read-write).
    public let descriptor: Int32
    /// A path that opens this file while the process lives.
    public let path: String

    public init() {
        var template = Array("/dev/shm/lycoris-fuzz-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        precondition(fd >= 0, "cannot create a scratch file in /dev/shm (errno \(errno))")
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        descriptor = fd
        path = "/proc/self/fd/\(fd)"
    }

    /// Replaces the file's contents with `bytes` and rewinds the descriptor to the start.
    public func store(_ bytes: UnsafeRawBufferPointer) {
        precondition(ftruncate(descriptor, 0) == 0, "ftruncate failed (errno \(errno))")
        var written = 0
        while written < bytes.count {
            let n = pwrite(descriptor, bytes.baseAddress! + written, bytes.count - written, off_t(written))
            precondition(n > 0, "pwrite failed (errno \(errno))")
            written += n
        }
        lseek(descriptor, 0, SEEK_SET)
    }
}
