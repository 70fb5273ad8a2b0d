import ArgumentParser
import Foundation
import LycorisAlgorithms

/// `lycoris merge --base BASE --adapter ADAPTER --out OUT [--multiplier M]`.
struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Merge an adapter into one model's state dict (W0 + m·ΔW, and b0 + m·Δb for norm modules; forward semantics).")

    @Option(help: "The model's state dict (.safetensors).") var base: String
    @Option(help: "The adapter file (.safetensors).") var adapter: String
    @Option(help: "Where to write the merged state dict.") var out: String
    @Option(help: "The adapter's multiplier m.") var multiplier: Float = 1
    @Flag(help: "Fail when an adapter module matches no base weight or cannot be merged.") var strict = false

    func validate() throws {
        guard multiplier.isFinite else { throw ValidationError("--multiplier must be finite, got \(multiplier)") }
    }

    func run() throws {
        let report = try AdapterMerge.merge(basePath: base, adapterPath: adapter, outputPath: out, multiplier: multiplier,
                                            strict: strict)
        print(report.written ? "merged \(report.merged.count) modules into \(out)" : "\(report.merged.count) modules merge; nothing written (--strict)")
        if !report.mergedBiases.isEmpty { print("biases merged too: \(report.mergedBiases.joined(separator: ", "))") }
        for (module, baseKey, algorithm) in report.merged { print("  \(module) → \(baseKey) (\(algorithm.rawValue))") }
        if !report.unmatched.isEmpty {
            print("unmatched adapter modules (no base weight with that path): \(report.unmatched.count)")
            for module in report.unmatched { print("  \(module)") }
        }
        if !report.failed.isEmpty {
            print("modules that could not be merged: \(report.failed.count)")
            for (module, reason) in report.failed { print("  \(module): \(reason)") }
        }
        if !report.written {
            // A failed job, not bad usage: exit 1, and --out was not touched.
            FileHandle.standardError.write(Data("Error: \(report.unmatched.count) unmatched and \(report.failed.count) failed modules; --strict wrote nothing to \(out)\n".utf8))
            throw ExitCode.failure
        }
    }
}
