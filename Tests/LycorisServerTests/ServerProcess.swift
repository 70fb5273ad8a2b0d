import Foundation
import LycorisRPC
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The built `lycoris-server` next to this test bundle (the test target depends on it).
let serverExecutable: URL = {
    let bundleDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    let candidates = [bundleDirectory, bundleDirectory.deletingLastPathComponent(), Bundle.main.bundleURL]
    return candidates.map { $0.appendingPathComponent("lycoris-server") }
        .first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? bundleDirectory.appendingPathComponent("lycoris-server")
}()

/// Writes to a pipe whose reader died must fail with EPIPE, not kill the test runner.
let ignoreSIGPIPE: Void = { signal(SIGPIPE, SIG_IGN); return () }()

struct ProcessTimeout: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out waiting for \(what)" }
}

/// A running `lycoris-server` with piped stdin, stdout and stderr. stdout and stderr are
/// drained by reader threads into buffers; every wait has a deadline, after which the
/// process is killed and the wait throws.
final class ServerProcess: @unchecked Sendable {
    let process = Process()
    let arenaDirectory: URL
    private let input = Pipe(), output = Pipe(), errors = Pipe()
    private let lock = NSLock()
    private var stdoutBytes: [UInt8] = []
    private var stderrBytes: [UInt8] = []
    private var openStreams = 2
    private var stdinOpen = true
    static let timeout: TimeInterval = 20

    /// `blockedSignals`: the signals blocked in the child at its start (the signal mask is
    /// inherited through exec). By default the child starts with SIGTERM, SIGINT and SIGHUP
    /// unblocked, whatever the mask of the test runner's thread.
    init(arguments: [String] = [], arenaDirectory: URL? = nil, blockedSignals: [Int32] = []) throws {
        _ = ignoreSIGPIPE
        let directory = arenaDirectory ?? FileManager.default.temporaryDirectory
            .appendingPathComponent("lycoris-server-process-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        self.arenaDirectory = directory
        // Keep these pipes out of any other child the test runner spawns meanwhile.
        for fd in [input, output, errors].flatMap({ [$0.fileHandleForReading.fileDescriptor, $0.fileHandleForWriting.fileDescriptor] }) {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        process.executableURL = serverExecutable
        process.arguments = ["--arena-dir", directory.path] + arguments
        process.standardInput = input
        process.standardOutput = output
        process.standardError = errors
        var handled = sigset_t(), blocked = sigset_t(), previous = sigset_t()
        sigemptyset(&handled)
        sigemptyset(&blocked)
        for sig in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&handled, sig) }
        for sig in blockedSignals { sigaddset(&blocked, sig) }
        pthread_sigmask(SIG_UNBLOCK, &handled, &previous)
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        try process.run()
        startReader(output.fileHandleForReading.fileDescriptor, isStdout: true)
        startReader(errors.fileHandleForReading.fileDescriptor, isStdout: false)
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        try? FileManager.default.removeItem(at: arenaDirectory)
    }

    private func startReader(_ fd: Int32, isStdout: Bool) {
        let thread = Thread { [self] in
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                lock.withLock {
                    if isStdout { stdoutBytes += chunk[0..<n] } else { stderrBytes += chunk[0..<n] }
                }
            }
            lock.withLock { openStreams -= 1 }
        }
        thread.start()
    }

    var stdout: [UInt8] { lock.withLock { stdoutBytes } }
    var stderr: String { lock.withLock { String(decoding: stderrBytes, as: UTF8.self) } }

    /// Writes bytes to the server's stdin (all of them, or throws).
    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        let fd = input.fileHandleForWriting.fileDescriptor
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
            }
            offset += n
        }
    }

    func send(_ text: String) throws { try send(Array(text.utf8)) }

    /// One request as an NDJSON line.
    func sendLine(_ message: JSONValue) throws { try send(JanssonCodec.encode(message) + [0x0A]) }

    /// One request with a Content-Length header.
    func sendFramed(_ message: JSONValue) throws {
        let body = JanssonCodec.encode(message)
        try send(Array("Content-Length: \(body.count)\r\n\r\n".utf8) + body)
    }

    func closeStdin() {
        guard stdinOpen else { return }
        stdinOpen = false
        try? input.fileHandleForWriting.close()
    }

    /// Waits until `predicate` holds for stdout, or throws after the timeout (killing the server).
    func waitForStdout(_ what: String, timeout: TimeInterval = ServerProcess.timeout, _ predicate: ([UInt8]) -> Bool) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !predicate(stdout) {
            guard Date() < deadline else {
                kill(process.processIdentifier, SIGKILL)
                throw ProcessTimeout(what: what)
            }
            usleep(2_000)
        }
    }

    /// Waits for the next `count` complete framed messages on stdout.
    func waitForMessages(_ count: Int, timeout: TimeInterval = ServerProcess.timeout) throws -> [FramedResponse] {
        try waitForStdout("\(count) responses", timeout: timeout) { (try? FramedResponse.parseAll($0))?.count ?? 0 >= count }
        return try FramedResponse.parseAll(stdout)
    }

    /// Waits for the process to exit and for both output streams to close; the exit status.
    @discardableResult
    func waitForExit(timeout: TimeInterval = ServerProcess.timeout) throws -> (status: Int32, reason: Process.TerminationReason) {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning || lock.withLock({ openStreams > 0 }) {
            guard Date() < deadline else {
                kill(process.processIdentifier, SIGKILL)
                throw ProcessTimeout(what: "the server to exit")
            }
            usleep(2_000)
        }
        return (process.terminationStatus, process.terminationReason)
    }

    /// A `/proc/<pid>/status` field of the child (Linux), e.g. `SigBlk`.
    func procStatus(_ field: String) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix(field + ":") }.map { $0.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces) }
    }

    /// Whether `signal` is in the child's blocked mask (nil where /proc is unavailable).
    func blocks(_ signal: Int32) -> Bool? {
        guard let mask = procStatus("SigBlk").flatMap({ UInt64($0, radix: 16) }) else { return nil }
        return mask & (1 << UInt64(signal - 1)) != 0
    }

    /// The first line of stderr that reports a crash (Swift's "Fatal error", a trap), if any.
    var crashLine: String? {
        stderr.split(separator: "\n").first { $0.contains("Fatal error") || $0.contains("runtime failure") || $0.contains("Crash") }.map(String.init)
    }

    /// Every file in the arena directory.
    var arenaFiles: [String] { (try? FileManager.default.contentsOfDirectory(atPath: arenaDirectory.path)) ?? [] }
}

/// One framed message read back from the server's stdout.
struct FramedResponse {
    enum Framing: Equatable { case ndjson, contentLength }
    let framing: Framing
    let body: [UInt8]
    let json: JSONValue

    struct Malformed: Error, CustomStringConvertible {
        let description: String
    }

    /// Splits `bytes` into framed messages: every byte must belong to a complete NDJSON line
    /// holding one JSON text, or to a `Content-Length: N\r\n\r\n` header and its N bytes.
    /// Throws on anything else; an incomplete final message is an error too.
    static func parseAll(_ bytes: [UInt8]) throws -> [FramedResponse] {
        var messages: [FramedResponse] = []
        var index = 0
        let header = Array("Content-Length: ".utf8)
        while index < bytes.count {
            if bytes[index...].starts(with: header) {
                guard let headerEnd = find(Array("\r\n\r\n".utf8), in: bytes, from: index) else {
                    throw Malformed(description: "incomplete Content-Length header at byte \(index)")
                }
                let text = String(decoding: bytes[(index + header.count)..<headerEnd], as: UTF8.self)
                guard let length = Int(text) else { throw Malformed(description: "bad Content-Length \(text)") }
                let start = headerEnd + 4
                guard start + length <= bytes.count else { throw Malformed(description: "incomplete Content-Length body") }
                let body = Array(bytes[start..<(start + length)])
                messages.append(FramedResponse(framing: .contentLength, body: body, json: try decode(body)))
                index = start + length
            } else {
                guard let newline = bytes[index...].firstIndex(of: 0x0A) else {
                    throw Malformed(description: "incomplete line at byte \(index)")
                }
                let body = Array(bytes[index..<newline])
                messages.append(FramedResponse(framing: .ndjson, body: body, json: try decode(body)))
                index = newline + 1
            }
        }
        return messages
    }

    private static func decode(_ body: [UInt8]) throws -> JSONValue {
        do { return try JanssonCodec.decode(body) } catch {
            throw Malformed(description: "not JSON: \(String(decoding: body, as: UTF8.self))")
        }
    }

    private static func find(_ needle: [UInt8], in haystack: [UInt8], from start: Int) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        var i = start
        while i + needle.count <= haystack.count {
            if haystack[i..<(i + needle.count)].elementsEqual(needle) { return i }
            i += 1
        }
        return nil
    }

    var response: WireResponse { get throws { try WireResponse(json) } }
}

/// A request object (for the process tests, which build their own ids).
func rpcRequest(_ id: JSONValue?, _ method: String, _ params: JSONValue? = nil) -> JSONValue {
    var object: JSONObject = ["jsonrpc": "2.0", "method": .string(method)]
    if let id { object["id"] = id }
    if let params { object["params"] = params }
    return .object(object)
}
