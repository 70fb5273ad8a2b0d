#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How one message is delimited on a byte stream; a reply uses its request's framing.
public enum Framing: String, Sendable {
    /// One JSON text per line, `\n`-terminated (a trailing `\r` is ignored).
    case newlineDelimited = "ndjson"
    /// LSP style: `Content-Length: N\r\n` (other headers ignored), `\r\n`, then N bytes.
    case contentLength = "content-length"
    /// A binary call record (``CallRecord``): a first byte 0xFF, its length in the header;
    /// the body is the whole record, and a reply is written as it is.
    case record
}

/// One framed message read from a stream, or a framing problem to answer.
public enum FramedMessage: Sendable {
    case message(body: [UInt8], framing: Framing)
    /// A header block without a usable Content-Length, or a message over the size limit
    /// (its bytes were skipped): answered with a parse error, then reading goes on.
    case malformed(reason: String, framing: Framing)
}

/// Reads framed messages from a file descriptor with blocking reads into one buffer; the
/// framing is detected per message (a message starting with `Content-Length:` is LSP
/// framed, one starting with the byte 0xFF is a binary call record, anything else is one
/// line).
public final class MessageReader {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private var start = 0
    private var atEOF = false
    /// The largest body accepted (bytes).
    public let maximumMessageSize: Int

    public init(fileDescriptor: Int32, maximumMessageSize: Int = 256 << 20) {
        fd = fileDescriptor
        self.maximumMessageSize = maximumMessageSize
    }

    /// The next message, or nil at end of input.
    public func next() -> FramedMessage? {
        // Skip blank space between messages.
        while true {
            while start < buffer.count, [0x20, 0x09, 0x0D, 0x0A].contains(buffer[start]) { start += 1 }
            if start < buffer.count { break }
            if !fill() { return nil }
        }
        if buffer[start] == CallRecord.magic { return readRecord() }
        // Read only while the bytes so far could still be the start of "Content-Length"
        // (so a short line such as `[]` is answered at once). Compared in place: no
        // allocation per message.
        let header = Self.contentLengthHeader
        while true {
            let available = min(buffer.count - start, header.count)
            var matches = true
            for i in 0..<available where buffer[start + i] | 0x20 != header[i] {
                matches = false
                break
            }
            if available == header.count { return matches ? readContentLength() : readLine() }
            if !matches || !fill() { return readLine() }
        }
    }

    private static let contentLengthHeader = Array("content-length".utf8)

    private func readLine() -> FramedMessage {
        var searchFrom = start
        while true {
            if let newline = buffer[searchFrom...].firstIndex(of: 0x0A) {
                var end = newline
                if end > start && buffer[end - 1] == 0x0D { end -= 1 }
                let body = Array(buffer[start..<end])
                start = newline + 1
                compact()
                return .message(body: body, framing: .newlineDelimited)
            }
            searchFrom = buffer.count
            if buffer.count - start > maximumMessageSize {
                // Skip to the end of the oversized line.
                while !atEOF {
                    start = buffer.count
                    compact()
                    guard fill() else { break }
                    if let newline = buffer[start...].firstIndex(of: 0x0A) { start = newline + 1; break }
                }
                compact()
                return .malformed(reason: "message longer than \(maximumMessageSize) bytes", framing: .newlineDelimited)
            }
            if !fill() {
                let body = Array(buffer[start...])
                start = buffer.count
                compact()
                return .message(body: body, framing: .newlineDelimited)
            }
        }
    }

    private func readContentLength() -> FramedMessage {
        // Headers end at an empty line ("\r\n\r\n", or "\n\n" from lenient writers).
        var headerEnd: (end: Int, next: Int)?
        while headerEnd == nil {
            headerEnd = findHeaderEnd()
            if headerEnd == nil && !fill() {
                start = buffer.count
                compact()
                return .malformed(reason: "input ended inside a Content-Length header", framing: .contentLength)
            }
        }
        let headerText = String(decoding: buffer[start..<headerEnd!.end], as: UTF8.self)
        start = headerEnd!.next
        var length: Int?
        // "\r\n" is a single Character in Swift: split on it as well as on lone CR and LF.
        for line in headerText.split(whereSeparator: { $0 == "\r\n" || $0 == "\r" || $0 == "\n" }) {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2, parts[0].lowercased() == "content-length" {
                length = Int(parts[1].trimmingCharacters())
            }
        }
        guard let length, length >= 0 else {
            compact()
            return .malformed(reason: "the header block has no valid Content-Length: \(headerText)", framing: .contentLength)
        }
        return readBody(length: length, framing: .contentLength,
                        tooLong: "Content-Length \(length) exceeds the limit of \(maximumMessageSize) bytes") {
            "input ended after \($0) of \(length) bytes"
        }
    }

    /// The next `length` bytes as one message; over the size limit they are skipped and the
    /// message is malformed (`tooLong`), and so it is when the input ends before them (`cut`
    /// of the bytes that came).
    private func readBody(length: Int, framing: Framing, tooLong: @autoclosure () -> String,
                          cut: (Int) -> String) -> FramedMessage {
        guard length <= maximumMessageSize else {
            skip(length)
            return .malformed(reason: tooLong(), framing: framing)
        }
        while buffer.count - start < length {
            if !fill() {
                let count = buffer.count - start
                start = buffer.count
                compact()
                return .malformed(reason: cut(count), framing: framing)
            }
        }
        let body = Array(buffer[start..<(start + length)])
        start += length
        compact()
        return .message(body: body, framing: framing)
    }

    /// A binary call record: its header's length field says how many bytes it has. A
    /// length shorter than the header or over the limit is skipped (as far as it says) and
    /// answered as malformed; so is a record cut short by the end of input.
    private func readRecord() -> FramedMessage {
        let lengthEnd = CallRecord.lengthOffset + 4
        while buffer.count - start < lengthEnd {
            if !fill() {
                let count = buffer.count - start
                start = buffer.count
                compact()
                return .malformed(reason: "input ended inside a call record header (\(count) of \(CallRecord.headerSize) bytes)", framing: .record)
            }
        }
        var length = 0
        for i in (0..<4).reversed() { length = length << 8 | Int(buffer[start + CallRecord.lengthOffset + i]) }
        guard length >= CallRecord.headerSize else {
            start += lengthEnd
            compact()
            return .malformed(reason: "call record length \(length) is shorter than its \(CallRecord.headerSize)-byte header", framing: .record)
        }
        return readBody(length: length, framing: .record,
                        tooLong: "call record length \(length) exceeds the limit of \(maximumMessageSize) bytes") {
            "input ended after \($0) of the call record's \(length) bytes"
        }
    }

    private func findHeaderEnd() -> (end: Int, next: Int)? {
        var i = start
        while i < buffer.count {
            if buffer[i] == 0x0A {
                if i + 1 < buffer.count && buffer[i + 1] == 0x0A { return (i, i + 2) }
                if i + 2 < buffer.count && buffer[i + 1] == 0x0D && buffer[i + 2] == 0x0A { return (i, i + 3) }
            }
            i += 1
        }
        return nil
    }

    private func skip(_ count: Int) {
        var remaining = count
        while remaining > 0 {
            let available = buffer.count - start
            if available == 0 && !fill() { break }
            let taken = min(remaining, buffer.count - start)
            start += taken
            remaining -= taken
            compact()
        }
    }

    /// Drops consumed bytes once they dominate the buffer.
    private func compact() {
        if start > 0 && (start == buffer.count || start > 1 << 20) {
            buffer.removeSubrange(0..<start)
            start = 0
        }
    }

    /// A fixed read buffer: each read costs what it returns, not the chunk size.
    private var scratch = [UInt8](repeating: 0, count: 1 << 16)

    /// Reads more bytes; false at end of input (or a read error).
    private func fill() -> Bool {
        if atEOF { return false }
        var n: Int
        repeat {
            n = scratch.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        } while n < 0 && errno == EINTR
        guard n > 0 else {
            atEOF = true
            return false
        }
        buffer.append(contentsOf: scratch[0..<n])
        return true
    }
}

/// Writes framed messages to a file descriptor (whole writes, retried on EINTR).
public final class MessageWriter {
    private let fd: Int32

    public init(fileDescriptor: Int32) { fd = fileDescriptor }

    /// Writes one message; false when the peer is gone.
    @discardableResult
    public func write(_ body: [UInt8], framing: Framing) -> Bool {
        var bytes: [UInt8]
        switch framing {
        case .newlineDelimited:
            bytes = body
            bytes.append(0x0A)
        case .contentLength:
            bytes = Array("Content-Length: \(body.count)\r\n\r\n".utf8) + body
        case .record:
            bytes = body
        }
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            offset += n
        }
        return true
    }
}

extension Substring {
    fileprivate func trimmingCharacters() -> String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}
