import LycorisCore

/// Everything that can go wrong reading or writing a safetensors file.
///
/// Each case carries the file (`path`; `"<memory>"` for an in-memory buffer) and, where there is one,
/// the tensor. ``rule`` is a short stable name of the rule that was broken (the same words as the
/// reference implementation's error names); ``description`` is a full sentence:
/// `safetensors file '<path>': <rule>: <details>`.
public enum SafetensorsError: Error, Equatable, CustomStringConvertible {
    // MARK: Opening

    /// The file could not be opened or inspected (missing, unreadable, ...).
    case cannotOpen(path: String, reason: String)
    /// The path is not a regular file (a directory, a device, ...).
    case notARegularFile(path: String)
    /// `mmap` failed.
    case mapFailed(path: String, reason: String)

    // MARK: Validation (in the order the checks run)

    /// Rules 2–3 failed and the first bytes show another kind of file (text, a ZIP archive, a
    /// pickle, …): `content` says which (see `ForeignFileKind`).
    case notSafetensors(path: String, content: String)
    /// Rule 1: the file is shorter than the 8-byte header length prefix.
    case headerTooSmall(path: String, fileSize: Int)
    /// Rule 2: the header length N exceeds ``SafetensorsHeader/maximumHeaderLength`` (100,000,000).
    case headerTooLarge(path: String, headerLength: UInt64)
    /// Rule 3: 8 + N overflows or exceeds the file size.
    case invalidHeaderLength(path: String, headerLength: UInt64, fileSize: Int)
    /// Rule 4a: the N header bytes are not valid UTF-8.
    case invalidHeaderUTF8(path: String, byteOffset: Int)
    /// Rule 4b: the header is not JSON, or not the safetensors schema. `key` is the top-level key
    /// (tensor name or `__metadata__`) the problem is under, when there is one.
    case invalidHeaderDeserialization(path: String, key: String?, reason: String)
    /// Rule 5: sorted by `data_offsets`, a tensor does not begin where the previous one ended (at 0
    /// for the first), or ends before it begins.
    case invalidOffset(path: String, tensor: String, begin: UInt64, end: UInt64, expectedBegin: UInt64)
    /// Rule 6a: the element count (product of the shape) times the element size overflows.
    case shapeOverflow(path: String, tensor: String, shape: [UInt64], dtype: DType)
    /// Rule 6b: the element count times the element size differs from `end - begin`.
    case tensorSizeMismatch(path: String, tensor: String, shape: [UInt64], dtype: DType, expectedBytes: UInt64, actualBytes: UInt64)
    /// Rule 7a: 8 + N + (end of the last tensor) overflows 64 bits.
    case bufferEndOverflow(path: String, tensor: String, end: UInt64)
    /// Rule 7b: 8 + N + (end of the last tensor) is not the file size: the buffer is truncated
    /// (file too short) or has trailing bytes (file too long).
    case incompleteBuffer(path: String, expectedFileSize: UInt64, fileSize: Int)

    // MARK: Access

    /// No tensor of that name in the file.
    case tensorNotFound(path: String, name: String)

    // MARK: Writing

    /// A tensor given to ``SafetensorsWriter`` is not valid (duplicate or reserved name, bytes that
    /// do not match the shape, a dtype that cannot be encoded, ...).
    case invalidEntry(name: String, reason: String)
    /// Writing the file failed; nothing was left behind (the target is untouched).
    case writeFailed(path: String, reason: String)

    /// The short, stable name of the broken rule, e.g. `"invalid offset"`.
    public var rule: String {
        switch self {
        case .cannotOpen: return "cannot open file"
        case .notARegularFile: return "not a regular file"
        case .mapFailed: return "cannot map file"
        case .notSafetensors: return "not a safetensors file"
        case .headerTooSmall: return "header too small"
        case .headerTooLarge: return "header too large"
        case .invalidHeaderLength: return "invalid header length"
        case .invalidHeaderUTF8: return "invalid header (not valid UTF-8)"
        case .invalidHeaderDeserialization: return "invalid header deserialization"
        case .invalidOffset: return "invalid offset"
        case .shapeOverflow, .bufferEndOverflow: return "validation overflow"
        case .tensorSizeMismatch: return "tensor invalid info"
        case .incompleteBuffer: return "metadata incomplete buffer"
        case .tensorNotFound: return "tensor not found"
        case .invalidEntry: return "invalid tensor entry"
        case .writeFailed: return "write failed"
        }
    }

    /// The file (or `"<memory>"`) the error is about, or nil for a writer entry error.
    public var path: String? {
        switch self {
        case .cannotOpen(let path, _), .notARegularFile(let path), .mapFailed(let path, _),
             .notSafetensors(let path, _), .headerTooSmall(let path, _), .headerTooLarge(let path, _),
             .invalidHeaderLength(let path, _, _), .invalidHeaderUTF8(let path, _),
             .invalidHeaderDeserialization(let path, _, _), .invalidOffset(let path, _, _, _, _),
             .shapeOverflow(let path, _, _, _), .tensorSizeMismatch(let path, _, _, _, _, _),
             .bufferEndOverflow(let path, _, _), .incompleteBuffer(let path, _, _), .tensorNotFound(let path, _), .writeFailed(let path, _):
            return path
        case .invalidEntry:
            return nil
        }
    }

    /// The tensor the error is about, when there is one.
    public var tensorName: String? {
        switch self {
        case .invalidOffset(_, let tensor, _, _, _), .shapeOverflow(_, let tensor, _, _),
             .tensorSizeMismatch(_, let tensor, _, _, _, _), .tensorNotFound(_, let tensor),
             .bufferEndOverflow(_, let tensor, _),
             .invalidEntry(let tensor, _):
            return tensor
        case .invalidHeaderDeserialization(_, let key, _):
            return key == SafetensorsHeader.metadataKey ? nil : key
        default:
            return nil
        }
    }

    public var description: String {
        let details: String
        switch self {
        case .cannotOpen(_, let reason):
            details = "cannot be opened for reading (\(reason))"
        case .notARegularFile:
            details = "the path is not a regular file"
        case .mapFailed(_, let reason):
            details = "mmap of the file failed (\(reason))"
        case .notSafetensors(_, let content):
            details = "the file is \(content), not a safetensors header"
        case .headerTooSmall(_, let size):
            details = "the file is \(size) bytes long, shorter than the 8-byte header length prefix"
        case .headerTooLarge(_, let n):
            details = "the header length prefix says \(n) bytes, more than the limit of \(SafetensorsHeader.maximumHeaderLength)"
        case .invalidHeaderLength(_, let n, let size):
            details = "the header length prefix says \(n) bytes, but 8 + \(n) is past the end of the \(size)-byte file"
        case .invalidHeaderUTF8(_, let offset):
            details = "the header JSON is not valid UTF-8 (first bad byte at header offset \(offset))"
        case .invalidHeaderDeserialization(_, let key, let reason):
            if let key {
                let what = key == SafetensorsHeader.metadataKey ? "\"\(key)\"" : "tensor \"\(key)\""
                details = "\(what): \(reason)"
            } else {
                details = reason
            }
        case .invalidOffset(_, let tensor, let begin, let end, let expected):
            if end < begin {
                details = "tensor \"\(tensor)\" has data_offsets [\(begin), \(end)] that end before they begin"
            } else {
                details = "tensor \"\(tensor)\" has data_offsets [\(begin), \(end)] but must begin at \(expected), where the previous tensor ends (tensors must be contiguous, non-overlapping and start at 0)"
            }
        case .shapeOverflow(_, let tensor, let shape, let dtype):
            details = "tensor \"\(tensor)\" with shape \(shape) and dtype \(dtype.rawValue) has a byte size that overflows 64 bits"
        case .tensorSizeMismatch(_, let tensor, let shape, let dtype, let expected, let actual):
            details = "tensor \"\(tensor)\" with shape \(shape) and dtype \(dtype.rawValue) needs \(expected) bytes, but its data_offsets span \(actual) bytes (size mismatch)"
        case .bufferEndOverflow(_, let tensor, let end):
            details = "tensor \"\(tensor)\" ends at data offset \(end), and that plus the header's length overflows 64 bits"
        case .incompleteBuffer(_, let expected, let size):
            let kind = UInt64(size) > expected ? "trailing bytes after the tensor data" : "tensor data truncated"
            details = "the header describes a \(expected)-byte file but the file is \(size) bytes (\(kind))"
        case .tensorNotFound(_, let name):
            details = "no tensor named \"\(name)\""
        case .invalidEntry(let name, let reason):
            return "safetensors writer: invalid tensor entry \"\(name)\": \(reason)"
        case .writeFailed(_, let reason):
            details = reason
        }
        return "safetensors file '\(path ?? "")': \(rule): \(details)"
    }
}
