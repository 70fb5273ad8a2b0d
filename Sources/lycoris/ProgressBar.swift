import Foundation

/// Progress of a long job on stderr (stdout keeps the summary and `--json`): on a terminal
/// one redrawn line `title [#####-----] done/total unit  elapsed 0:05  ETA 0:12`, at most
/// ten times a second; otherwise, once a second has passed, a plain line at every tenth of
/// the work; nothing with `quiet`. ETA = elapsed · (total − done) / done. Updates may come from several threads.
final class ProgressBar: @unchecked Sendable {
    let title: String
    let unit: String
    let total: Int
    let quiet: Bool
    let isTerminal: Bool
    private let start = Date()
    private var lastDraw = Date.distantPast
    private var lastTenth = 0
    private let lock = NSLock()

    init(_ title: String, total: Int, unit: String = "layers", quiet: Bool, isTerminal: Bool = isatty(2) != 0) {
        self.title = title
        self.total = total
        self.unit = unit
        self.quiet = quiet
        self.isTerminal = isTerminal
    }

    /// Seconds since the bar was created.
    var elapsed: Double { Date().timeIntervalSince(start) }

    func update(_ done: Int) {
        guard !quiet, total > 0 else { return }
        lock.lock()
        defer { lock.unlock() }
        let now = Date()
        if isTerminal {
            guard done == total || now.timeIntervalSince(lastDraw) >= 0.1 else { return }
            lastDraw = now
            let width = 24, filled = width * done / total
            let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
            write("\r\(title) [\(bar)] \(line(done))\u{1B}[K" + (done == total ? "\n" : ""))
        } else {
            // Plain lines only for a job that lasts: a quick one (or one that fails at once)
            // leaves stderr to its result.
            let tenth = 10 * done / total
            guard elapsed >= 1, tenth > lastTenth || done == total else { return }
            lastTenth = tenth
            write("\(title): \(line(done))\n")
        }
    }

    private func line(_ done: Int) -> String {
        let seconds = elapsed
        let eta = done > 0 && done < total ? "  ETA \(Self.clock(seconds * Double(total - done) / Double(done)))" : ""
        return "\(done)/\(total) \(unit)  elapsed \(Self.clock(seconds))\(eta)"
    }

    /// `m:ss`, or `h:mm:ss` from an hour on.
    static func clock(_ seconds: Double) -> String {
        let whole = Int(seconds.rounded())
        let (hours, minutes, secs) = (whole / 3600, whole / 60 % 60, whole % 60)
        let tail = String(format: "%02d", secs)
        return hours > 0 ? "\(hours):" + String(format: "%02d", minutes) + ":" + tail : "\(minutes):" + tail
    }

    private func write(_ text: String) {
        FileHandle.standardError.write(Data(text.utf8))
    }
}
