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

/// Builds a safetensors file from tensors and writes it atomically.
///
/// Entries hold their data in memory (``add(_:_:as:)``, ``addRaw(_:dtype:shape:bytes:)``) or
/// produce it while the file is written (``addStreamed(_:dtype:shape:produce:)``): the header
/// needs only names, dtypes and shapes, so a file far larger than memory is written one
/// tensor at a time, each computed just before its bytes go out.
///
/// ## Output format
/// - 8-byte little-endian header length N, then N bytes of compact JSON, then the data.
/// - The JSON starts with `{"`; `"__metadata__"` comes first (only when the metadata is non-empty,
///   keys sorted by Unicode scalar order), then the tensors **in the order they were added**, each
///   as `"name":{"dtype":"F32","shape":[2,3],"data_offsets":[begin,end]}` (`"shape":[]` for a 0-dim
///   scalar).
/// - The JSON is padded with spaces (0x20) so that N is a multiple of 8 (the data then starts
///   8-byte aligned).
/// - Tensor data is packed contiguously in the same order, little-endian.
/// - Strings are escaped as JSON requires: `"` → `\"`, `\` → `\\`, the C0 controls as `\b \f \n
///   \r \t` or `\u00XX` (lowercase hex); everything else, non-ASCII included, is written as UTF-8.
///
/// The result passes every rule of ``SafetensorsHeader``, so it reads back here and in the
/// reference implementation.
public struct SafetensorsWriter: Sendable {
    /// How one entry's bytes are produced.
    public enum Payload: Sendable {
        /// Float32 values, encoded to the entry's dtype when written (F64, F32, F16 or BF16).
        case floats([Float])
        /// Bytes written as they are (little-endian elements of the entry's dtype).
        case raw([UInt8])
        /// Bytes produced when the file is written: `produce` is called once, in entry order, and
        /// must pass exactly `byteCount` bytes to its sink (in any number of calls).
        case streamed(byteCount: Int, produce: @Sendable (_ sink: ByteSink) throws -> Void)
    }

    /// Where a streamed entry writes its bytes; valid only during the `produce` call.
    public typealias ByteSink = (UnsafeRawBufferPointer) throws -> Void

    /// One tensor to write.
    public struct Entry: Sendable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
        public let payload: Payload

        /// The number of data bytes (elements × dtype size).
        public var byteCount: Int {
            switch payload {
            case .floats(let values): return values.count * dtype.byteSize
            case .raw(let bytes): return bytes.count
            case .streamed(let byteCount, _): return byteCount
            }
        }
    }

    /// The `__metadata__` map; written only when non-empty.
    public var metadata: [String: String]
    /// The tensors, in the order they will be written.
    public private(set) var entries: [Entry] = []
    private var names: Set<String> = []

    public init(metadata: [String: String] = [:]) {
        self.metadata = metadata
    }

    /// Adds `tensor`, to be stored as `dtype` (F64, F32, F16 or BF16; narrowing rounds to nearest even).
    /// - Throws: ``SafetensorsError/invalidEntry(name:reason:)`` for a duplicate or reserved name or
    ///   a dtype that cannot be encoded from Float.
    public mutating func add(_ name: String, _ tensor: Tensor, as dtype: DType = .f32) throws {
        guard dtype.isEncodable else {
            throw SafetensorsError.invalidEntry(
                name: name, reason: "dtype \(dtype.rawValue) cannot be encoded from Float; use F64, F32, F16 or BF16, or addRaw")
        }
        try register(name)
        entries.append(Entry(name: name, dtype: dtype, shape: tensor.shape, payload: .floats(tensor.scalars)))
    }

    /// Adds a tensor given as raw little-endian bytes of any dtype, e.g. a 0-dim `I64`.
    /// - Throws: ``SafetensorsError/invalidEntry(name:reason:)`` for a duplicate or reserved name, a
    ///   negative dimension, or a byte count other than prod(shape) × dtype size.
    public mutating func addRaw(_ name: String, dtype: DType, shape: [Int], bytes: [UInt8]) throws {
        let expected = try Self.byteCount(name, dtype: dtype, shape: shape)
        guard expected == bytes.count else {
            throw SafetensorsError.invalidEntry(
                name: name, reason: "shape \(shape) of \(dtype.rawValue) needs \(expected) bytes, but \(bytes.count) were given")
        }
        try register(name)
        entries.append(Entry(name: name, dtype: dtype, shape: shape, payload: .raw(bytes)))
    }

    /// Adds a tensor whose prod(shape) × dtype-size bytes `produce` passes to its sink when the
    /// file is written (the entry's turn comes in the order added). What `produce` throws
    /// fails the write, as does a byte count other than the shape's (the target is then left
    /// untouched). ``streamFloats(_:as:into:)`` encodes Float values for it.
    /// - Throws: ``SafetensorsError/invalidEntry(name:reason:)`` for a duplicate or reserved name or
    ///   a negative dimension.
    public mutating func addStreamed(_ name: String, dtype: DType, shape: [Int],
                                     produce: @escaping @Sendable (_ sink: ByteSink) throws -> Void) throws {
        let byteCount = try Self.byteCount(name, dtype: dtype, shape: shape)
        try register(name)
        entries.append(Entry(name: name, dtype: dtype, shape: shape, payload: .streamed(byteCount: byteCount, produce: produce)))
    }

    /// prod(shape) × dtype size, refusing negative dimensions and overflow.
    private static func byteCount(_ name: String, dtype: DType, shape: [Int]) throws -> Int {
        var elements = 1
        for dimension in shape {
            guard dimension >= 0 else {
                throw SafetensorsError.invalidEntry(name: name, reason: "shape \(shape) has a negative dimension")
            }
            let (product, overflow) = elements.multipliedReportingOverflow(by: dimension)
            guard !overflow else {
                throw SafetensorsError.invalidEntry(name: name, reason: "shape \(shape) has too many elements")
            }
            elements = product
        }
        let (expected, overflow) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else {
            throw SafetensorsError.invalidEntry(name: name, reason: "shape \(shape) of \(dtype.rawValue) needs more than Int.max bytes")
        }
        return expected
    }

    /// Adds 64-bit integers as an `I64` tensor (pass `shape: []` for a 0-dim scalar).
    /// - Throws: as ``addRaw(_:dtype:shape:bytes:)``.
    public mutating func add(_ name: String, int64 values: [Int64], shape: [Int]) throws {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(values.count * 8)
        for value in values {
            withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
        }
        try addRaw(name, dtype: .i64, shape: shape, bytes: bytes)
    }

    private mutating func register(_ name: String) throws {
        guard name != SafetensorsHeader.metadataKey else {
            throw SafetensorsError.invalidEntry(name: name, reason: "\"__metadata__\" is reserved for the metadata map")
        }
        guard names.insert(name).inserted else {
            throw SafetensorsError.invalidEntry(name: name, reason: "a tensor of that name was already added")
        }
    }

    // MARK: - Serialization

    /// The 8-byte length prefix followed by the padded JSON header.
    public func headerBytes() -> [UInt8] {
        var json: [UInt8] = []
        json.append(UInt8(ascii: "{"))
        var first = true
        func separator() {
            if !first { json.append(UInt8(ascii: ",")) }
            first = false
        }
        if !metadata.isEmpty {
            separator()
            appendJSONString(SafetensorsHeader.metadataKey, to: &json)
            json.append(contentsOf: Array(":{".utf8))
            var firstMember = true
            for key in metadata.keys.sorted(by: { $0.unicodeScalars.lexicographicallyPrecedes($1.unicodeScalars) }) {
                if !firstMember { json.append(UInt8(ascii: ",")) }
                firstMember = false
                appendJSONString(key, to: &json)
                json.append(UInt8(ascii: ":"))
                appendJSONString(metadata[key] ?? "", to: &json)
            }
            json.append(UInt8(ascii: "}"))
        }
        var offset = 0
        for entry in entries {
            separator()
            appendJSONString(entry.name, to: &json)
            json.append(contentsOf: Array(":{\"dtype\":\"".utf8))
            json.append(contentsOf: Array(entry.dtype.rawValue.utf8))
            json.append(contentsOf: Array("\",\"shape\":[".utf8))
            json.append(contentsOf: Array(entry.shape.map(String.init).joined(separator: ",").utf8))
            let end = offset + entry.byteCount
            json.append(contentsOf: Array("],\"data_offsets\":[\(offset),\(end)]}".utf8))
            offset = end
        }
        json.append(UInt8(ascii: "}"))
        let padding = (8 - json.count % 8) % 8
        json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: padding))
        var result: [UInt8] = []
        result.reserveCapacity(8 + json.count)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { result.append(contentsOf: $0) }
        result.append(contentsOf: json)
        return result
    }

    /// The whole file in memory.
    /// - Throws: what a streamed entry's `produce` throws, or a byte count that does not match.
    public func serialized() throws -> [UInt8] {
        var result = headerBytes()
        result.reserveCapacity(result.count + entries.reduce(0) { $0 + $1.byteCount })
        try forEachDataChunk { result.append(contentsOf: $0) }
        return result
    }

    /// Encodes `values` to `dtype` (F64, F32, F16 or BF16; narrowing rounds to nearest even) and
    /// passes the bytes to `sink` in chunks of at most 2^18 elements, so a large tensor is never
    /// encoded into one more full-size copy.
    /// - Throws: ``SafetensorsError/invalidEntry(name:reason:)`` for a dtype that cannot be encoded
    ///   from Float, or what `sink` throws.
    public static func streamFloats(_ values: [Float], as dtype: DType, into sink: ByteSink) throws {
        guard dtype.isEncodable else {
            throw SafetensorsError.invalidEntry(name: "", reason: "dtype \(dtype.rawValue) cannot be encoded from Float")
        }
        let chunkElements = 1 << 18
        let size = dtype.byteSize
        var scratch = [UInt8](repeating: 0, count: min(values.count, chunkElements) * size)
        try values.withUnsafeBufferPointer { source in
            var start = 0
            while start < source.count {
                let end = min(start + chunkElements, source.count)
                let chunk = UnsafeBufferPointer(rebasing: source[start..<end])
                let byteCount = chunk.count * size
                try scratch.withUnsafeMutableBytes { destination in
                    let window = UnsafeMutableRawBufferPointer(rebasing: destination[0..<byteCount])
                    try encodeFloats(chunk, as: dtype, into: window)
                    try sink(UnsafeRawBufferPointer(window))
                }
                start = end
            }
        }
    }

    /// Calls `body` with the data bytes of every entry in order (float payloads through
    /// ``streamFloats(_:as:into:)``, streamed ones as their producer passes them, checked to
    /// add up to the entry's byte count).
    private func forEachDataChunk(_ body: ByteSink) throws {
        for entry in entries {
            switch entry.payload {
            case .raw(let bytes):
                try bytes.withUnsafeBytes(body)
            case .floats(let values):
                try Self.streamFloats(values, as: entry.dtype, into: body)
            case .streamed(let byteCount, let produce):
                var produced = 0
                try produce { chunk in
                    produced += chunk.count
                    guard produced <= byteCount else {
                        throw SafetensorsError.invalidEntry(name: entry.name, reason: "its producer passed more than the \(byteCount) bytes of its shape")
                    }
                    try body(chunk)
                }
                guard produced == byteCount else {
                    throw SafetensorsError.invalidEntry(
                        name: entry.name, reason: "its producer passed \(produced) bytes; its shape needs \(byteCount)")
                }
            }
        }
    }

    // MARK: - Writing

    /// Writes the file to `url` atomically (see ``write(toPath:)``).
    public func write(to url: URL) throws {
        try write(toPath: url.withUnsafeFileSystemRepresentation { $0.map { String(cString: $0) } } ?? url.path)
    }

    /// Writes the file to `path` atomically: the bytes go to a new, uniquely named temporary file in
    /// the same directory (`.<name>.tmp-<pid>-<random>`), which is `fsync`ed and then `rename`d over
    /// `path`; then the directory is `fsync`ed. Readers see either the old file or the complete new
    /// one, never a partial file. Temporary files in that directory left by saves whose process
    /// has died are removed first.
    ///
    /// - Throws: ``SafetensorsError/writeFailed(path:reason:)`` naming `path` and the failing step
    ///   (e.g. an unwritable or missing directory). On any failure before the rename the temporary
    ///   file is removed and `path` is left untouched.
    public func write(toPath path: String) throws {
        try write(toPath: path, failingAt: nil)
    }

    /// The steps of ``write(toPath:)``; tests inject a failure at one to check the cleanup.
    enum WriteStep: Sendable {
        case afterCreatingTemporary, afterWritingData, beforeRename
    }

    func write(toPath path: String, failingAt injectedFailure: WriteStep?) throws {
        func failure(_ step: String, _ code: Int32) -> SafetensorsError {
            .writeFailed(path: path, reason: "\(step) failed: \(systemErrorDescription(code))")
        }
        let (directory, fileName) = splitPath(path)
        guard !fileName.isEmpty, fileName != ".", fileName != ".." else {
            throw SafetensorsError.writeFailed(path: path, reason: "the path does not name a file")
        }
        // Temporary files of saves whose process was killed go first (see ``LeftoverFiles``).
        LeftoverFiles.removeDead(in: directory, pidOf: LeftoverFiles.temporaryFilePID)
        let suffix = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        let temporaryPath = (directory == "" ? "" : directory + "/") + ".\(fileName).tmp-\(getpid())-\(suffix)"

        let fd = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw failure("creating a temporary file in directory '\(directory.isEmpty ? "." : directory)'", errno)
        }
        var descriptor: Int32? = fd
        var renamed = false
        defer {
            if let open = descriptor { close(open) }
            if !renamed { unlink(temporaryPath) }
        }
        func injected(_ step: WriteStep) throws {
            if injectedFailure == step {
                throw SafetensorsError.writeFailed(path: path, reason: "injected failure \(step)")
            }
        }

        try injected(.afterCreatingTemporary)
        let header = headerBytes()
        try header.withUnsafeBytes { try writeAll(fd, $0, path: path) }
        try forEachDataChunk { try writeAll(fd, $0, path: path) }
        try injected(.afterWritingData)
        guard fsync(fd) == 0 else { throw failure("fsync of the temporary file", errno) }
        let closeResult = close(fd)
        descriptor = nil
        guard closeResult == 0 else { throw failure("closing the temporary file", errno) }
        try injected(.beforeRename)
        guard rename(temporaryPath, path) == 0 else { throw failure("renaming the temporary file over the target", errno) }
        renamed = true

        // Make the rename durable. Some file systems refuse fsync on a directory (EINVAL); that is
        // not an error worth failing over.
        let directoryDescriptor = open(directory.isEmpty ? "." : directory, O_RDONLY | O_CLOEXEC)
        if directoryDescriptor >= 0 {
            let result = fsync(directoryDescriptor)
            let code = errno
            close(directoryDescriptor)
            if result != 0 && code != EINVAL {
                throw failure("fsync of the directory after the rename (the new file is in place)", code)
            }
        }
    }
}

/// Writes `tensors` (in the given order, each stored as `dtype`) and `metadata` to `url` atomically.
/// See ``SafetensorsWriter`` for the format and ``SafetensorsWriter/write(toPath:)`` for atomicity.
public func writeSafetensors(_ tensors: [(name: String, tensor: Tensor)], metadata: [String: String] = [:],
                             dtype: DType = .f32, to url: URL) throws {
    var writer = SafetensorsWriter(metadata: metadata)
    for (name, tensor) in tensors {
        try writer.add(name, tensor, as: dtype)
    }
    try writer.write(to: url)
}

// MARK: - Helpers

/// Splits `path` at its last `/` into (directory, file name); the directory is `""` for a bare
/// name and `"/"` for a file at the root.
private func splitPath(_ path: String) -> (directory: String, fileName: String) {
    guard let slash = path.lastIndex(of: "/") else { return ("", path) }
    let directory = String(path[..<slash])
    return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
}

private func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws {
    guard var pointer = buffer.baseAddress else { return }
    var remaining = buffer.count
    while remaining > 0 {
        let written = write(fd, pointer, remaining)
        if written < 0 {
            let code = errno
            if code == EINTR { continue }
            throw SafetensorsError.writeFailed(path: path, reason: "writing the temporary file failed: \(systemErrorDescription(code))")
        }
        pointer += written
        remaining -= written
    }
}

/// Appends `string` as a JSON string literal.
private func appendJSONString(_ string: String, to json: inout [UInt8]) {
    json.append(UInt8(ascii: "\""))
    for byte in string.utf8 {
        switch byte {
        case UInt8(ascii: "\""): json.append(contentsOf: [0x5C, 0x22])
        case UInt8(ascii: "\\"): json.append(contentsOf: [0x5C, 0x5C])
        case 0x08: json.append(contentsOf: [0x5C, UInt8(ascii: "b")])
        case 0x0C: json.append(contentsOf: [0x5C, UInt8(ascii: "f")])
        case 0x0A: json.append(contentsOf: [0x5C, UInt8(ascii: "n")])
        case 0x0D: json.append(contentsOf: [0x5C, UInt8(ascii: "r")])
        case 0x09: json.append(contentsOf: [0x5C, UInt8(ascii: "t")])
        case 0x00..<0x20:
            let hex = Array("0123456789abcdef".utf8)
            json.append(contentsOf: [0x5C, UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"),
                                     hex[Int(byte >> 4)], hex[Int(byte & 0xF)]])
        default:
            json.append(byte)
        }
    }
    json.append(UInt8(ascii: "\""))
}
