import ArgumentParser
import CMalloc
import Foundation
import Logging
import LycorisCore
import LycorisFormats
import LycorisServer

/// `lycoris-server`: JSON-RPC 2.0 on stdin/stdout (see protocol/README.md).
@main
struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lycoris-server",
        abstract: "Serve LyCORIS adapters over JSON-RPC 2.0 on stdin/stdout; logs go to stderr.")

    @Option(help: "Directory for shared-memory arenas (env LYCORIS_ARENA_DIR).")
    var arenaDir: String = ProcessInfo.processInfo.environment["LYCORIS_ARENA_DIR"] ?? "/dev/shm"

    @Option(help: "OpenBLAS threads, 0 for OpenBLAS's default (env LYCORIS_THREADS).")
    var threads: Int = ProcessInfo.processInfo.environment["LYCORIS_THREADS"].flatMap(Int.init) ?? 0

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (env LYCORIS_LOG_LEVEL).")
    var logLevel: String = ProcessInfo.processInfo.environment["LYCORIS_LOG_LEVEL"] ?? "info"

    @Option(name: .customLong("device-check"), help: .hidden)
    var deviceCheck: String?

    @Option(name: .customLong("device-bench"), help: .hidden)
    var deviceBench: String?

    @Option(name: .customLong("cuda-library-dir"), help: .hidden)
    var cudaLibraryDirectories: [String] = []

    func run() throws {
        if let device = deviceCheck ?? deviceBench {
            throw ExitCode(DeviceCheck.run(device, libraryDirectories: cudaLibraryDirectories, timing: deviceCheck == nil))
        }
        let protocolFD = StdioServer.claimStandardOutput()
        guard let level = Logger.Level(rawValue: logLevel) else { throw ValidationError("unknown log level \(logLevel)") }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        if threads > 0 { BLASThreads.set(threads) }
        // Keep freed memory in the heap: tensors of the same sizes come back every step, and
        // fresh mmap'd blocks would fault in every page each time.
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, Int32.max)
        let logger = Logger(label: "lycoris-server")
        for path in LeftoverFiles.removeDead(in: arenaDir, pidOf: LeftoverFiles.arenaFilePID) {
            logger.info("removed \(path), the arena of a server that is gone")
        }
        logger.info("lycoris-server \(LycorisService.serverVersion) ready (protocol \(LycorisService.protocolVersion), BLAS threads \(BLASThreads.current))")
        let status = StdioServer.run(LycorisService(arenaDirectory: arenaDir, logger: logger), output: protocolFD)
        throw ExitCode(status)
    }
}
