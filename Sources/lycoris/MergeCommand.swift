import ArgumentParser
import Foundation
import LycorisAlgorithms
import LycorisCheckpoints
import LycorisCore

/// A `--dtype` value: a float dtype a file can be written in, in either case; an error for
/// any other names the four.
extension DType: ExpressibleByArgument {
    public init?(argument: String) {
        guard let dtype = DType(rawValue: argument.uppercased()), dtype.isEncodable else { return nil }
        self = dtype
    }

    public static var allValueStrings: [String] { [DType.f32, .f16, .bf16, .f64].map { $0.rawValue.lowercased() } }
}

/// `lycoris merge --base CKPT --adapter FILE[:M] [--adapter …] --out OUT`: adapters merged into
/// a single-file checkpoint, a diffusers folder or a plain state dict, written in the same layout.
struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Merge adapters into a checkpoint: W0 + Σ m·ΔW (and b0 + m·Δb for norm modules; forward semantics).",
        discussion: """
            BASE is a .safetensors checkpoint (SD1/SD2/SDXL single file, or any state dict) or a \
            diffusers folder; OUT has the same layout. Modules are matched by their kohya names \
            (see `lycoris layers BASE`); for a plain state dict `PREFIX_a_b_c` matches `a.b.c.weight`.
            """)

    @Option(help: "The checkpoint: a .safetensors file or a diffusers folder.") var base: String
    @Option(help: ArgumentHelp("An adapter file, with its multiplier after a colon (FILE:0.8); repeat for several.",
                               valueName: "file[:multiplier]")) var adapter: [String]
    @Option(help: "Where to write the merged checkpoint (a new folder for a diffusers input).") var out: String
    @Option(parsing: .unconditional, help: "The multiplier of adapters given without one.") var multiplier: Float = 1
    @Option(help: "Store every float tensor as this dtype (f32, f16, bf16); default: as in the input.") var dtype: DType?
    @Option(help: "The model family (sd1, sd2, sdxl) instead of detecting it from the keys.") var modelType: ModelFamily?
    @Flag(help: "Write nothing and fail when an adapter module matches no layer or cannot be merged.") var strict = false
    @Flag(help: "No progress bar.") var quiet = false
    @Flag(help: "Print the summary as JSON.") var json = false

    /// `FILE[:M]`: the multiplier is what follows the last colon when it parses as a number.
    static func parse(_ argument: String, default multiplier: Float) -> CheckpointMerge.Adapter {
        if let colon = argument.lastIndex(of: ":"), let value = Float(argument[argument.index(after: colon)...]) {
            return CheckpointMerge.Adapter(path: String(argument[..<colon]), multiplier: value)
        }
        return CheckpointMerge.Adapter(path: argument, multiplier: multiplier)
    }

    func validate() throws {
        guard !adapter.isEmpty else { throw ValidationError("give at least one --adapter") }
        guard multiplier.isFinite else { throw ValidationError("--multiplier must be finite, got \(multiplier)") }
        for parsed in adapter.map({ Self.parse($0, default: multiplier) }) where !parsed.multiplier.isFinite {
            throw ValidationError("the multiplier of \(parsed.path) must be finite, got \(parsed.multiplier)")
        }
    }

    func run() throws {
        let adapters = adapter.map { Self.parse($0, default: multiplier) }
        var baseIsFolder: ObjCBool = false
        if !FileManager.default.fileExists(atPath: base, isDirectory: &baseIsFolder) || !baseIsFolder.boolValue {
            try JobOutput.checkFileOutput(out)
        }
        let job = JobOutput("merge", unit: "tensors", quiet: quiet || json)
        let report = try CheckpointMerge.merge(checkpoint: base, adapters: adapters, output: out, dtype: dtype, family: modelType,
                                               strict: strict, progress: job.progress)
        if json {
            try JobOutput.printJSON(Self.jsonObject(report, seconds: job.seconds))
        } else {
            print(Self.summary(report, adapters: adapters, out: out, seconds: job.seconds))
        }
        if !report.written {
            // A failed job, not bad usage: exit 1, and --out was not touched.
            FileHandle.standardError.write(Data("Error: \(report.unmatched.count) unmatched and \(report.failed.count) failed modules; --strict wrote nothing to \(out)\n".utf8))
            throw ExitCode.failure
        }
    }

    static func summary(_ report: CheckpointMerge.Report, adapters: [CheckpointMerge.Adapter], out: String, seconds: Double) -> String {
        var lines: [String] = []
        let several = adapters.count > 1
        lines.append(report.written ? "merged \(report.merged.count) modules into \(out)" : "\(report.merged.count) modules merge; nothing written (--strict)")
        lines.append("checkpoint: \(report.layout.rawValue), family \(report.family?.rawValue ?? "none (plain state dict)")")
        if !report.mergedBiases.isEmpty { lines.append("biases merged too: \(report.mergedBiases.joined(separator: ", "))") }
        lines += JobOutput.listing(report.merged.map { merged in
            let rows = merged.rows.map { " rows \($0.lowerBound)..<\($0.upperBound)" } ?? ""
            return "\(several ? merged.adapter + ": " : "")\(merged.module) → \(merged.key)\(rows) (\(merged.algorithm.rawValue))"
        })
        if !report.unmatched.isEmpty {
            lines.append("unmatched adapter modules (no base weight with that path): \(report.unmatched.count)")
            lines.append("  looked for: \(report.lookedFor)")
            lines += JobOutput.listing(report.unmatched.map { "\(several ? $0.adapter + ": " : "")\($0.module)" })
        }
        if !report.failed.isEmpty {
            lines.append("modules that could not be merged: \(report.failed.count)")
            lines += JobOutput.listing(report.failed.map { "\(several ? $0.adapter + ": " : "")\($0.module): \($0.reason)" })
        }
        // Summary table: per adapter, modules merged / unmatched / failed.
        lines.append("")
        lines.append("adapter".padding(toLength: 50, withPad: " ", startingAt: 0) + "     m  merged  unmatched  failed")
        for adapter in adapters {
            let name = adapter.path.count > 50 ? "…" + adapter.path.suffix(49) : Substring(adapter.path)
            let counts = [report.merged.filter { $0.adapter == adapter.path }.count,
                          report.unmatched.filter { $0.adapter == adapter.path }.count,
                          report.failed.filter { $0.adapter == adapter.path }.count]
            lines.append(String(name).padding(toLength: 50, withPad: " ", startingAt: 0)
                         + String(format: " %5.2f  %6d  %9d  %6d", adapter.multiplier, counts[0], counts[1], counts[2]))
        }
        lines.append(String(format: "%d tensors written in %.1f s", report.tensorCount, seconds))
        return lines.joined(separator: "\n")
    }

    static func jsonObject(_ report: CheckpointMerge.Report, seconds: Double) -> [String: Any] {
        [
            "written": report.written, "layout": report.layout.rawValue, "family": report.family?.rawValue ?? NSNull(),
            "merged": report.merged.map { merged -> [String: Any] in
                ["adapter": merged.adapter, "module": merged.module, "key": merged.key, "algorithm": merged.algorithm.rawValue,
                 "rows": merged.rows.map { [$0.lowerBound, $0.upperBound] } ?? NSNull()]
            },
            "merged_biases": report.mergedBiases,
            "unmatched": report.unmatched.map { ["adapter": $0.adapter, "module": $0.module] },
            "looked_for": report.lookedFor,
            "failed": report.failed.map { ["adapter": $0.adapter, "module": $0.module, "reason": $0.reason] },
            "files": report.files, "tensors": report.tensorCount, "seconds": seconds,
        ]
    }
}
