import Foundation
import LycorisCheckpoints

/// What the long commands share around their job: a ``ProgressBar`` made at the job's first
/// `progress(done, total)` call (the total is known only then; calls may come from several
/// threads), the job's seconds, and its report printed on stdout as JSON for `--json`.
final class JobOutput: @unchecked Sendable {
    let title: String
    let unit: String
    let quiet: Bool
    private let bar = Box<ProgressBar>()
    private let start = Date()

    /// `quiet`: no bar (`--quiet`, or `--json` whose stdout a script reads).
    init(_ title: String, unit: String = "layers", quiet: Bool) {
        self.title = title
        self.unit = unit
        self.quiet = quiet
    }

    /// The job's progress callback.
    func progress(_ done: Int, _ total: Int) {
        bar.value(orMake: { ProgressBar(title, total: total, unit: unit, quiet: quiet) }).update(done)
    }

    /// Seconds since the job began.
    var seconds: Double { Date().timeIntervalSince(start) }

    /// Refuses, before the job starts, an output file path that is a folder (the job would
    /// run to the end and fail on the final rename).
    static func checkFileOutput(_ path: String) throws {
        var isFolder: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isFolder), isFolder.boolValue {
            throw CheckpointError("\(path) is a folder; give the path of the .safetensors file to write")
        }
    }

    /// The first 20 of `items` as indented lines, then how many more `--json` lists.
    static func listing(_ items: [String]) -> [String] {
        items.prefix(20).map { "  " + $0 } + (items.count > 20 ? ["  … and \(items.count - 20) more (--json lists them all)"] : [])
    }

    /// `object` as pretty-printed JSON with sorted keys on stdout.
    static func printJSON(_ object: [String: Any]) throws {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }
}

/// A value made on first use from any thread.
final class Box<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var current: Value?

    func value(orMake make: () -> Value) -> Value {
        lock.withLock {
            if let current { return current }
            let made = make()
            current = made
            return made
        }
    }
}
