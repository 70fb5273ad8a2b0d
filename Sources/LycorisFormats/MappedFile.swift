#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A whole regular file mapped read-only into memory (`mmap(PROT_READ, MAP_PRIVATE)`), unmapped
/// on deinit. An empty file maps to an empty buffer.
///
/// Immutable after init, hence `@unchecked Sendable`. The mapping reflects the file as it is on
/// disk: if another process truncates the file while it is mapped, touching the lost pages raises
/// SIGBUS, which no reader can guard against; safetensors files are assumed not to be modified
/// while open.
final class MappedFile: @unchecked Sendable {
    let path: String
    /// The mapped bytes; valid for the lifetime of this object.
    let bytes: UnsafeRawBufferPointer
    private let mappedBase: UnsafeMutableRawPointer?

    /// Maps the file at `path`.
    /// - Throws: ``SafetensorsError/cannotOpen(path:reason:)``, ``SafetensorsError/notARegularFile(path:)``,
    ///   ``SafetensorsError/mapFailed(path:reason:)``.
    init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SafetensorsError.cannotOpen(path: path, reason: systemErrorDescription(errno)) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw SafetensorsError.cannotOpen(path: path, reason: systemErrorDescription(errno))
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw SafetensorsError.notARegularFile(path: path) }
        guard info.st_size >= 0, let size = Int(exactly: info.st_size) else {
            throw SafetensorsError.mapFailed(path: path, reason: "file size \(info.st_size) is not addressable")
        }
        if size == 0 {
            mappedBase = nil
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        let address = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let address, address != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw SafetensorsError.mapFailed(path: path, reason: systemErrorDescription(errno))
        }
        mappedBase = address
        bytes = UnsafeRawBufferPointer(start: address, count: size)
    }

    deinit {
        if let mappedBase {
            munmap(mappedBase, bytes.count)
        }
    }
}

/// `strerror(code)` with the numeric code, e.g. `No such file or directory (errno 2)`.
func systemErrorDescription(_ code: Int32) -> String {
    "\(String(cString: strerror(code))) (errno \(code))"
}
