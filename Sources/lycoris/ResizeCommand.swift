import ArgumentParser
import Foundation
import LycorisCheckpoints
import LycorisCore

/// `lycoris resize IN OUT --rank N [--dynamic-method sv_fro --dynamic-param 0.9]`.
struct ResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Reduce the ranks of an adapter's LoRA/LoCon/DyLoRA modules by the SVD of their ΔW (kohya's resize_lora rules).")

    enum Method: String, ExpressibleByArgument, CaseIterable {
        case svRatio = "sv_ratio", svCumulative = "sv_cumulative", svFro = "sv_fro"
    }

    @Argument(help: "The adapter file to resize.") var input: String
    @Argument(help: "Where to write the resized file.") var output: String
    @Option(help: "The new rank, or the largest rank a dynamic method may choose.") var rank: Int = 4
    @Option(help: "Choose each module's rank: sv_ratio, sv_cumulative or sv_fro.") var dynamicMethod: Method?
    @Option(help: "The dynamic method's target (ratio of S₁, cumulative fraction, Frobenius fraction).") var dynamicParam: Float?
    @Option(help: "Store the factors as this dtype (default: as in the input).") var dtype: DType?
    @Flag(help: "No progress bar.") var quiet = false
    @Flag(help: "Print the per-module report as JSON.") var json = false

    func validate() throws {
        guard rank > 0 else { throw ValidationError("--rank must be positive") }
        if dynamicMethod != nil, dynamicParam == nil { throw ValidationError("--dynamic-method needs --dynamic-param") }
        if let dynamicParam, !(dynamicParam > 0) { throw ValidationError("--dynamic-param must be positive") }
    }

    func run() throws {
        let rule: AdapterResize.Rule = switch (dynamicMethod, dynamicParam) {
        case (.svRatio, let t?): .svRatio(t)
        case (.svCumulative, let t?): .svCumulative(t)
        case (.svFro, let t?): .svFro(t)
        default: .fixed
        }
        let start = Date()
        var bar: ProgressBar?
        let report = try AdapterResize.resize(input: input, output: output, rank: rank, rule: rule, dtype: dtype) { done, total in
            if bar == nil { bar = ProgressBar("resize", total: total, unit: "modules", quiet: quiet || json) }
            bar?.update(done)
        }
        let seconds = Date().timeIntervalSince(start)
        if json {
            let object: [String: Any] = [
                "output": output, "seconds": seconds, "kept": report.kept.map { ["module": $0.name, "algorithm": $0.algorithm] },
                "modules": report.resized.map { m -> [String: Any] in
                    ["name": m.name, "old_rank": m.oldRank, "new_rank": m.newRank, "new_alpha": m.newAlpha,
                     "sum_retained": m.sumRetained, "fro_retained": m.froRetained, "max_ratio": m.maxRatio]
                },
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        // The row after the name takes 45 columns: names are cut to fit 100.
        let width = min(54, max(6, report.resized.map(\.name.count).max() ?? 6))
        print("module".padding(toLength: width, withPad: " ", startingAt: 0) + "  rank → new   alpha    sum(S)   fro    S1/Sr")
        for m in report.resized {
            let name = m.name.count > width ? "…" + m.name.suffix(width - 1) : Substring(m.name)
            print(String(name).padding(toLength: width, withPad: " ", startingAt: 0)
                  + String(format: "  %4d → %3d  %6.2f  %6.1f%%  %5.1f%%  %6.1f", m.oldRank, m.newRank, m.newAlpha,
                           100 * m.sumRetained, 100 * m.froRetained, m.maxRatio))
        }
        if !report.kept.isEmpty { print("kept unchanged (not LoRA): \(report.kept.count)") }
        let fro = report.resized.map(\.froRetained)
        print(String(format: "resized %d modules into %@; mean Frobenius retained %.2f%%; %.1f s", report.resized.count, output,
                     100 * (fro.isEmpty ? 1 : fro.reduce(0, +) / Float(fro.count)), seconds))
    }
}
