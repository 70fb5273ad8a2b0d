import ArgumentParser
import Foundation
import LycorisCheckpoints
import LycorisCore

extension LowRankExtraction.Mode: ExpressibleByArgument {}

/// `lycoris extract BASE TUNED OUT`: a LoCon file holding TUNED − BASE, with LyCORIS's
/// `extract_locon` options and rank rules.
struct ExtractCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "extract",
        abstract: "Extract the difference of two checkpoints as a LoCon file (LyCORIS's extract_diff rules).",
        discussion: """
            Each Linear/Conv2d layer's ΔW = TUNED − BASE becomes lora_down/lora_up (and lora_mid for \
            k×k convs unless --disable-tucker) at the mode's rank, or a full `diff` when that rank \
            reaches half the output size. --mode fixed uses a randomised SVD (within 1% of the \
            exact SVD's reconstruction error) unless --exact; the other modes need the exact SVD.
            """)

    @Argument(help: "The base checkpoint (.safetensors or diffusers folder).") var base: String
    @Argument(help: "The fine-tuned checkpoint of the same model.") var tuned: String
    @Argument(help: "The adapter file to write.") var out: String
    @Option(help: "How ranks are chosen: fixed, threshold, ratio, quantile, or full (every layer's whole ΔW).") var mode: LowRankExtraction.Mode = .fixed
    @Option(help: "Rank of Linear and 1×1 conv layers (fixed).") var linearDim = 1
    @Option(help: "Rank of k×k conv layers (fixed).") var convDim = 1
    @Option(help: "Keep singular values above this (threshold).") var linearThreshold: Float = 0
    @Option(help: "Keep singular values above this (threshold).") var convThreshold: Float = 0
    @Option(help: "Keep singular values above this fraction of the largest (ratio).") var linearRatio: Float = 0
    @Option(help: "Keep singular values above this fraction of the largest (ratio).") var convRatio: Float = 0
    @Option(help: "Keep the leading singular values summing below this fraction of all (quantile).") var linearQuantile: Float = 1
    @Option(help: "Keep the leading singular values summing below this fraction of all (quantile).") var convQuantile: Float = 1
    @Flag(help: "No Tucker core (lora_mid) for k×k convs.") var disableTucker = false
    @Flag(help: "Store the largest residual entries as a sparse bias (bias_indices/values/size).") var sparseBias = false
    @Option(help: "Quantile of |residual| below which the sparse bias drops entries.") var sparsity: Float = 0.98
    @Flag(inversion: .prefixedNo, help: "Extract the text encoders too.") var textEncoder = true
    @Option(help: "Dtype of the stored tensors (f16 as LyCORIS, f32, bf16).") var dtype: DType = .f16
    @Flag(help: "Full SVD (LAPACK sgesdd) for fixed ranks too.") var exact = false
    @Option(help: "The model family (sd1, sd2, sdxl) instead of detecting it from the keys.") var modelType: ModelFamily?
    @Option(help: "Layers extracted at once (default: the cores).") var threads: Int?
    @Flag(help: "No progress bar.") var quiet = false
    @Flag(help: "Print the summary and every layer as JSON.") var json = false

    func validate() throws {
        switch mode {
        case .fixed: guard linearDim > 0, convDim > 0 else { throw ValidationError("--linear-dim and --conv-dim must be positive") }
        case .threshold: guard linearThreshold >= 0, convThreshold >= 0 else { throw ValidationError("thresholds must be >= 0") }
        case .ratio: guard (0...1).contains(linearRatio), (0...1).contains(convRatio) else { throw ValidationError("ratios must be in [0, 1]") }
        case .quantile: guard (0...1).contains(linearQuantile), (0...1).contains(convQuantile) else { throw ValidationError("quantiles must be in [0, 1]") }
        case .full: break
        }
        guard (0...1).contains(sparsity) else { throw ValidationError("--sparsity must be in [0, 1]") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    func run() throws {
        try JobOutput.checkFileOutput(out)
        let (linear, conv): (Float, Float) = switch mode {
        case .fixed, .full: (Float(linearDim), Float(convDim))
        case .threshold: (linearThreshold, convThreshold)
        case .ratio: (linearRatio, convRatio)
        case .quantile: (linearQuantile, convQuantile)
        }
        var extraction = LowRankExtraction.Options(mode: mode, linearParameter: linear, convParameter: conv)
        extraction.tucker = !disableTucker
        extraction.sparseBias = sparseBias
        extraction.sparsity = sparsity
        extraction.exact = exact
        var options = CheckpointExtract.Options(extraction: extraction)
        options.textEncoders = textEncoder
        options.dtype = dtype
        options.family = modelType
        if let threads { options.workers = threads }
        let job = JobOutput("extract", quiet: quiet || json)
        let report = try CheckpointExtract.extract(base: base, tuned: tuned, output: out, options: options, progress: job.progress)
        if json {
            try JobOutput.printJSON(Self.jsonObject(report, out: out, seconds: job.seconds))
        } else {
            print(Self.summary(report, out: out, seconds: job.seconds))
        }
    }

    static func summary(_ report: CheckpointExtract.Report, out: String, seconds: Double) -> String {
        var lines = ["extracted \(report.layers.filter { $0.kind != .unchanged }.count) of \(report.layers.count) layers into \(out)"
                     + " (family \(report.family?.rawValue ?? "none"))"]
        lines.append("kind       layers   ranks       mean error   max error")
        for kind in [LowRankExtraction.Result.Kind.lowRank, .full, .unchanged] {
            let group = report.layers.filter { $0.kind == kind }
            guard !group.isEmpty else { continue }
            let ranks = group.compactMap(\.rank)
            let range = ranks.isEmpty ? "-" : ranks.min()! == ranks.max()! ? "\(ranks.min()!)" : "\(ranks.min()!)–\(ranks.max()!)"
            let errors = group.map(\.relativeError)
            lines.append(kind.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)
                         + String(format: " %6d   ", group.count) + range.padding(toLength: 10, withPad: " ", startingAt: 0)
                         + String(format: "  %10.5f  %10.5f", errors.reduce(0, +) / Float(errors.count), errors.max() ?? 0))
        }
        if !report.unmatched.isEmpty {
            lines.append("tuned layers without a base layer of that name and shape: \(report.unmatched.count)")
            lines += JobOutput.listing(report.unmatched)
        }
        lines.append(String(format: "%d parameters, %.1f MB, %.1f s", report.parameters, Double(report.bytes) / 1e6, seconds))
        return lines.joined(separator: "\n")
    }

    static func jsonObject(_ report: CheckpointExtract.Report, out: String, seconds: Double) -> [String: Any] {
        [
            "output": out, "family": report.family?.rawValue ?? NSNull(), "parameters": report.parameters, "bytes": report.bytes,
            "seconds": seconds, "unmatched": report.unmatched,
            "layers": report.layers.map { layer -> [String: Any] in
                ["name": layer.name, "shape": layer.shape, "kind": layer.kind.rawValue, "rank": layer.rank ?? NSNull(),
                 "relative_error": layer.relativeError, "seconds": layer.seconds]
            },
        ]
    }
}

