import ArgumentParser
import LycorisCheckpoints
import LycorisCore

extension CheckpointComponent: ExpressibleByArgument {}

/// `lycoris convert IN OUT [--dtype f16] [--rename FROM=TO] [--keep REGEX] [--drop REGEX]`, and
/// `lycoris convert IN OUT --to peft|kohya --model CKPT [--component unet]` for HF PEFT folders.
struct ConvertCommand: ParsableCommand {
    enum Target: String, ExpressibleByArgument, CaseIterable { case peft, kohya }

    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Rewrite an adapter file: dtype, module-name prefixes, modules kept or dropped, DyLoRA conv lora_up repaired; or to/from an HF PEFT LoRA, LoHa or LoKr folder.")

    @Argument(help: "The adapter file.") var input: String
    @Argument(help: "Where to write the converted file.") var output: String
    @Option(help: "Store float tensors as this dtype (f32, f16, bf16); alpha stays F32.") var dtype: DType?
    @Option(help: ArgumentHelp("Rename a module-name prefix, e.g. lycoris_=lora_unet_ (repeatable).", valueName: "from=to"))
    var rename: [String] = []
    @Option(help: "Keep only modules whose name matches this regular expression (repeatable).") var keep: [String] = []
    @Option(help: "Drop modules whose name matches this regular expression (repeatable).") var drop: [String] = []
    @Option(help: "peft: write IN's LoRA, LoHa or LoKr modules as a PEFT folder OUT; kohya: read the PEFT folder IN into a kohya file OUT.")
    var to: Target?
    @Option(help: "The checkpoint whose layers name the modules (with --to).") var model: String?
    @Option(help: "The model the PEFT adapter belongs to: unet, text_encoder, text_encoder_2.") var component: CheckpointComponent = .unet
    @Option(help: "The model family (sd1, sd2, sdxl) instead of detecting it from the keys.") var modelType: ModelFamily?
    @Flag(help: "No progress bar.") var quiet = false
    @Flag(help: "Print the report as JSON.") var json = false

    func validate() throws {
        if let to, model == nil { throw ValidationError("--to \(to.rawValue) needs --model CHECKPOINT, the checkpoint whose layers name the modules") }
        for pair in rename where !pair.contains("=") { throw ValidationError("--rename takes FROM=TO, not '\(pair)'") }
        for pattern in keep + drop where (try? Regex(pattern)) == nil {
            throw ValidationError("'\(pattern)' is not a regular expression")
        }
    }

    func run() throws {
        if to != .peft { try JobOutput.checkFileOutput(output) }
        let job = JobOutput("convert", unit: "modules", quiet: quiet || json)
        if let to {
            let model = model!
            let report = to == .peft
                ? try PEFTInterchange.export(adapter: input, checkpoint: model, component: component, family: modelType, output: output,
                                             progress: job.progress)
                : try PEFTInterchange.import(peft: input, checkpoint: model, component: component, family: modelType, output: output,
                                             progress: job.progress)
            if json {
                try JobOutput.printJSON([
                    "input": input, "output": output, "to": to.rawValue, "peft_type": report.peftType, "seconds": job.seconds,
                    "converted": report.converted, "skipped": report.skipped.map { ["module": $0.module, "reason": $0.reason] },
                ])
                return
            }
            let lines = report.skipped.isEmpty ? []
                : ["skipped: \(report.skipped.count)"] + JobOutput.listing(report.skipped.map { "\($0.module): \($0.reason)" })
            print((lines + Self.table(output: output, counts: [("converted", report.converted.count), ("skipped", report.skipped.count)],
                                      note: "\(to.rawValue)\(report.peftType.isEmpty ? "" : ", " + report.peftType)", seconds: job.seconds))
                .joined(separator: "\n"))
            return
        }
        var options = AdapterConvert.Options()
        options.dtype = dtype
        options.renames = rename.map { pair in
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            return (String(parts[0]), String(parts[1]))
        }
        options.keep = keep
        options.drop = drop
        let report = try AdapterConvert.convert(input: input, output: output, options: options, progress: job.progress)
        if json {
            try JobOutput.printJSON([
                "input": input, "output": output, "seconds": job.seconds, "written": report.written, "dropped": report.dropped,
                "renamed": report.renamed, "repaired": report.repaired,
            ])
            return
        }
        var lines = report.dropped.isEmpty ? [] : ["dropped: \(report.dropped.count)"] + JobOutput.listing(report.dropped)
        if !report.repaired.isEmpty { lines.append("conv lora_up reshaped to N-D: \(report.repaired.joined(separator: ", "))") }
        print((lines + Self.table(output: output, counts: [("written", report.written.count), ("renamed", report.renamed),
                                                           ("dropped", report.dropped.count), ("repaired", report.repaired.count)],
                                  note: dtype.map { "as \($0.rawValue)" } ?? "", seconds: job.seconds)).joined(separator: "\n"))
    }

    /// The summary table: the output file and a column per count (fits 100 columns), then the time.
    static func table(output: String, counts: [(String, Int)], note: String, seconds: Double) -> [String] {
        let width = 100 - counts.count * 11
        let name = output.count > width ? "…" + output.suffix(width - 1) : Substring(output)
        return ["",
                "output".padding(toLength: width, withPad: " ", startingAt: 0) + counts.map { " " + $0.0.leftPadded(10) }.joined(),
                String(name).padding(toLength: width, withPad: " ", startingAt: 0) + counts.map { " " + String($0.1).leftPadded(10) }.joined(),
                String(format: "%@%.1f s", note.isEmpty ? "" : note + "; ", seconds)]
    }
}

extension String {
    /// Right-aligned in `width` columns.
    func leftPadded(_ width: Int) -> String { String(repeating: " ", count: max(0, width - count)) + self }
}
