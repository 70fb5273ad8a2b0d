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

    func validate() throws {
        for pair in rename where !pair.contains("=") { throw ValidationError("--rename takes FROM=TO, not '\(pair)'") }
        for pattern in keep + drop where (try? Regex(pattern)) == nil {
            throw ValidationError("'\(pattern)' is not a regular expression")
        }
    }

    func run() throws {
        if let to {
            guard let model else { throw ValidationError("--to \(to.rawValue) needs --model CHECKPOINT") }
            let report = to == .peft
                ? try PEFTInterchange.export(adapter: input, checkpoint: model, component: component, family: modelType, output: output)
                : try PEFTInterchange.import(peft: input, checkpoint: model, component: component, family: modelType, output: output)
            print("converted \(report.converted.count) modules into \(output) (\(to.rawValue)\(report.peftType.isEmpty ? "" : ", " + report.peftType))")
            if !report.skipped.isEmpty { print("skipped: \(report.skipped.count)") }
            for (module, reason) in report.skipped { print("  \(module): \(reason)") }
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
        let report = try AdapterConvert.convert(input: input, output: output, options: options)
        print("wrote \(report.written.count) modules to \(output) (\(report.renamed) renamed, \(report.dropped.count) dropped)")
        if !report.repaired.isEmpty { print("conv lora_up reshaped to N-D: \(report.repaired.joined(separator: ", "))") }
        for name in report.dropped { print("  dropped \(name)") }
    }
}
