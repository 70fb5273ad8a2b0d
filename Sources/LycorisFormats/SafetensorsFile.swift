#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import LycorisCore

/// A safetensors file opened for reading: memory-mapped read-only, its header validated by every
/// rule of ``SafetensorsHeader`` when opened, its tensors read on demand.
///
/// The mapping lives as long as this object; ``withRawBytes(_:_:)`` hands out pointers into it that
/// must not escape the closure. Immutable, so it can be shared across threads.
public final class SafetensorsFile: Sendable {
    /// The file's path as given.
    public let path: String
    /// The validated header.
    public let header: SafetensorsHeader
    private let mapping: MappedFile
    private let indexByName: [String: Int]

    /// Opens and validates the file at `url` (a file URL).
    /// - Throws: ``SafetensorsError`` naming the path: the file cannot be opened or mapped, or its
    ///   header breaks one of the rules of ``SafetensorsHeader``.
    public convenience init(contentsOf url: URL) throws {
        try self.init(path: url.withUnsafeFileSystemRepresentation { $0.map { String(cString: $0) } } ?? url.path)
    }

    /// Opens and validates the file at `path`.
    /// - Throws: ``SafetensorsError`` naming the path: the file cannot be opened or mapped, or its
    ///   header breaks one of the rules of ``SafetensorsHeader``.
    public init(path: String) throws {
        self.path = path
        mapping = try MappedFile(path: path)
        header = try SafetensorsHeader.validate(file: mapping.bytes, path: path)
        var index: [String: Int] = [:]
        index.reserveCapacity(header.tensors.count)
        for (position, info) in header.tensors.enumerated() {
            index[info.name] = position
        }
        indexByName = index
    }

    /// The `__metadata__` map (empty when absent).
    public var metadata: [String: String] { header.metadata }

    /// The tensors in file order (sorted by offset).
    public var tensors: [TensorInfo] { header.tensors }

    /// The tensor names in file order.
    public var tensorNames: [String] { header.tensors.map(\.name) }

    /// The file's size in bytes.
    public var fileSize: Int { mapping.bytes.count }

    /// The entry for `name`, or nil if there is none.
    public func info(_ name: String) -> TensorInfo? {
        indexByName[name].map { header.tensors[$0] }
    }

    /// Whether the file holds a tensor named `name`.
    public func contains(_ name: String) -> Bool {
        indexByName[name] != nil
    }

    /// The tensor `name` converted to a `Float32` ``Tensor`` with the same shape, following the rules
    /// of ``decodeFloats(_:as:)`` (exact for F32/F16/BF16/F8 and small integers; F64, I64 and I32
    /// rounded to nearest; BOOL as 0/1).
    /// - Throws: ``SafetensorsError/tensorNotFound(path:name:)``.
    public func tensor(_ name: String) throws -> Tensor {
        let info = try requireInfo(name)
        let scalars = withBytes(of: info) { decodeFloats($0, as: info.dtype) }
        return Tensor(shape: info.shape, scalars: scalars)
    }

    /// All tensors, converted as by ``tensor(_:)``, keyed by name.
    public func allTensors() -> [String: Tensor] {
        var result: [String: Tensor] = [:]
        result.reserveCapacity(header.tensors.count)
        for info in header.tensors {
            result[info.name] = Tensor(shape: info.shape, scalars: withBytes(of: info) { decodeFloats($0, as: info.dtype) })
        }
        return result
    }

    /// Calls `body` with the raw little-endian bytes of tensor `name` (exactly `info.byteCount` bytes,
    /// not necessarily aligned). The pointer is valid only during the call.
    /// - Throws: ``SafetensorsError/tensorNotFound(path:name:)``, or what `body` throws.
    public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let info = try requireInfo(name)
        return try withBytes(of: info, body)
    }

    /// A copy of the raw little-endian bytes of tensor `name`.
    /// - Throws: ``SafetensorsError/tensorNotFound(path:name:)``.
    public func rawBytes(_ name: String) throws -> [UInt8] {
        try withRawBytes(name) { [UInt8]($0) }
    }

    /// Hands the mapped pages of tensor `name` back to the kernel (`madvise(MADV_DONTNEED)` on
    /// the read-only private mapping: a later read refetches them from the file), so a reader
    /// that goes through a large file once keeps only the tensors in use resident. Pages
    /// shared with a neighbouring tensor are handed back too; nothing is lost but time.
    public func releasePages(_ name: String) {
        guard let info = info(name) else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        withBytes(of: info) { bytes in
            guard let start = bytes.baseAddress, bytes.count > 0 else { return }
            let first = Int(bitPattern: start) / page * page
            let end = (Int(bitPattern: start) + bytes.count + page - 1) / page * page
            _ = madvise(UnsafeMutableRawPointer(bitPattern: first), end - first, MADV_DONTNEED)
        }
    }

    private func requireInfo(_ name: String) throws -> TensorInfo {
        guard let info = info(name) else { throw SafetensorsError.tensorNotFound(path: path, name: name) }
        return info
    }

    private func withBytes<R>(of info: TensorInfo, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        let start = header.dataStart + info.byteRange.lowerBound
        let end = header.dataStart + info.byteRange.upperBound
        return try body(UnsafeRawBufferPointer(rebasing: mapping.bytes[start..<end]))
    }
}
