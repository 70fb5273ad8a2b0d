#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Files that a killed process left behind: the temporary file of an interrupted atomic save
/// (`.<name>.tmp-<pid>-<hex>`, see ``SafetensorsWriter/write(toPath:)``) and the arena file of
/// a server killed outright (`lycoris-arena-<pid>-<counter>-<hex>`). Each name carries its
/// creator's pid; a file is removed only when its name has exactly that form and no process
/// with that pid exists (`kill(pid, 0)` fails with `ESRCH`), so a save or a server still
/// running keeps its files. A pid since reused by an unrelated process keeps its file until
/// a later sweep: a leftover is never mistaken the other way round.
public enum LeftoverFiles {
    /// The pid in a temporary-file name `.<name>.tmp-<pid>-<hex>`, or nil.
    public static func temporaryFilePID(_ fileName: String) -> Int32? {
        // ".", the name, then "tmp-<pid>-<hex>" after the last dot (pid and hex have none).
        let parts = fileName.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 3, parts[0].isEmpty, let last = parts.last, last.hasPrefix("tmp-") else { return nil }
        return pid(in: last.dropFirst(4), hexTailParts: 1)
    }

    /// The pid in an arena name `lycoris-arena-<pid>-<counter>-<hex>`, or nil.
    public static func arenaFilePID(_ fileName: String) -> Int32? {
        let prefix = "lycoris-arena-"
        guard fileName.hasPrefix(prefix) else { return nil }
        return pid(in: fileName.dropFirst(prefix.count), hexTailParts: 2)
    }

    /// Removes the files of `directory` whose name `pidOf` recognises and whose process is
    /// gone; returns their paths. Unreadable directories and files that vanish meanwhile are
    /// skipped: this is housekeeping, never a reason for the caller to fail.
    @discardableResult
    public static func removeDead(in directory: String, pidOf: (String) -> Int32?) -> [String] {
        guard let stream = opendir(directory.isEmpty ? "." : directory) else { return [] }
        defer { closedir(stream) }
        var removed: [String] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard let pid = pidOf(name), pid > 0, pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            let path = (directory.isEmpty ? "" : directory.hasSuffix("/") ? directory : directory + "/") + name
            if unlink(path) == 0 { removed.append(path) }
        }
        return removed
    }

    /// `<pid>-<part>[-<part>]`: a decimal pid then `hexTailParts` dash-separated parts, the
    /// last hexadecimal and the others decimal.
    private static func pid(in text: Substring, hexTailParts: Int) -> Int32? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        func digits(_ part: Substring, hex: Bool = false) -> Bool {
            !part.isEmpty && part.utf8.allSatisfy { (0x30...0x39).contains($0) || (hex && (0x61...0x66).contains($0 | 0x20)) }
        }
        guard parts.count == 1 + hexTailParts, digits(parts[0]), let pid = Int32(parts[0]),
              parts.dropFirst().dropLast().allSatisfy({ digits($0) }), let last = parts.last, digits(last, hex: true)
        else { return nil }
        return pid
    }
}
