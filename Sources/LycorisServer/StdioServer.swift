#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import LycorisRPC

/// The stdin/stdout transport: requests on stdin, responses on stdout in the framing each
/// request used, logs on stderr.
public enum StdioServer {
    /// Takes stdout for the protocol and makes it unusable for anything else: the real
    /// stdout is duplicated for the protocol writer and descriptor 1 is pointed at stderr,
    /// so a stray `print` lands in the log, never in the protocol stream. Also ignores
    /// SIGPIPE (a vanished client ends the loop instead of killing the process) and unlinks
    /// the arena on SIGTERM/SIGINT/SIGHUP.
    public static func claimStandardOutput() -> Int32 {
        let protocolFD = dup(STDOUT_FILENO)
        dup2(STDERR_FILENO, STDOUT_FILENO)
        signal(SIGPIPE, SIG_IGN)
        // A parent may hand down a mask blocking these; unblock them so they are handled.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            signal(sig, ArenaCleanup.handleSignal)
            sigaddset(&stopSignals, sig)
        }
        sigprocmask(SIG_UNBLOCK, &stopSignals, nil)
        return protocolFD
    }

    /// Serves until stdin ends or `shutdown`; releases everything and returns the exit status (0).
    public static func run(_ service: LycorisService, input: Int32 = STDIN_FILENO, output: Int32) -> Int32 {
        let reader = MessageReader(fileDescriptor: input)
        let writer = MessageWriter(fileDescriptor: output)
        defer { service.releaseAll() }
        while let framed = reader.next() {
            switch framed {
            case let .message(body, .record):
                guard let response = service.handleRecord(body) else { break }
                guard writer.write(response, framing: .record) else {
                    service.logger.warning("the client stopped reading; exiting")
                    return 0
                }
            case let .message(body, framing):
                if let response = JSONRPCDispatcher.process(body, handler: service.handle) {
                    guard writer.write(response, framing: framing) else {
                        service.logger.warning("the client stopped reading; exiting")
                        return 0
                    }
                }
            case let .malformed(reason, .record):
                guard writer.write(CallRecordWriter.error(id: 0, .parseError(reason)), framing: .record) else { return 0 }
            case let .malformed(reason, framing):
                let response = JSONRPCDispatcher.errorResponse(id: .null, .parseError(reason))
                guard writer.write(JanssonCodec.encode(response), framing: framing) else { return 0 }
            }
            if service.shutdownRequested { break }
        }
        return 0
    }
}

/// The arena's file path, kept where a signal handler can reach it (async-signal-safe:
/// `unlink` and `_exit` only).
enum ArenaCleanup {
    nonisolated(unsafe) static var path: UnsafeMutablePointer<CChar>?

    static func register(_ path: String) {
        unregister()
        Self.path = strdup(path)
    }

    static func unregister() {
        let old = path
        path = nil
        free(old)
    }

    static let handleSignal: @convention(c) (Int32) -> Void = { sig in
        if let path = ArenaCleanup.path { unlink(path) }
        _exit(128 + sig)
    }
}
