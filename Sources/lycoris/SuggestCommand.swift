import ArgumentParser
import Foundation
import LycorisCheckpoints
import LycorisCore

/// `lycoris suggest --model CKPT --budget 10MB`: per layer LoRA, LoHa or LoKr at the highest
/// rank of ΔW the budget allows (``AlgorithmSuggestion``).
struct SuggestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "suggest",
        abstract: "Plan per layer the LoRA/LoHa/LoKr configuration with the highest attainable rank of ΔW under a size budget.")

    @Option(help: "The checkpoint whose Linear/Conv layers are adapted (.safetensors or diffusers folder).") var model: String
    @Option(help: "The budget: bytes with a unit (10MB, 500KB, 1GB; decimal) or a parameter count.") var budget: String
    @Option(help: "The dtype the adapter is stored in, for a budget in bytes.") var dtype: DType = .f16
    @Flag(inversion: .prefixedNo, help: "Adapt the text encoders too.") var textEncoder = true
    @Option(help: "The model family (sd1, sd2, sdxl) instead of detecting it from the keys.") var modelType: ModelFamily?
    @Flag(help: "No progress bar.") var quiet = false
    @Flag(help: "Print the plan as JSON, every layer.") var json = false

    func validate() throws {
        guard AlgorithmSuggestion.parameters(budget: budget, dtype: dtype) != nil else { throw ValidationError("--budget: '\(budget)' is not a size (10MB) or a count") }
    }

    func run() throws {
        let checkpoint = try Checkpoint(path: model)
        let table = try CheckpointLayers(checkpoint, family: modelType)
        let job = JobOutput("suggest", quiet: quiet || json)
        let layers = table.layers.enumerated().compactMap { index, layer -> AlgorithmSuggestion.Layer? in
            defer { job.progress(index + 1, table.layers.count) }
            guard textEncoder || layer.component == .unet || layer.component == nil else { return nil }
            let shape = checkpoint.weightShape(of: layer)
            return shape.count == 2 || shape.count == 4 ? .init(name: layer.name, shape: shape) : nil
        }
        let plan = try AlgorithmSuggestion.plan(layers, budget: AlgorithmSuggestion.parameters(budget: budget, dtype: dtype)!)
        if json {
            let object: [String: Any] = [
                "budget": plan.budget, "parameters": plan.parameters, "bytes": plan.parameters * dtype.byteSize, "target": plan.target,
                "layers": plan.layers.map { entry -> [String: Any] in
                    ["name": entry.layer.name, "shape": entry.layer.shape, "algorithm": entry.choice.algorithm.rawValue,
                     "rank": entry.choice.rank, "factor": entry.choice.factor.map { [$0.0, $0.1] } ?? NSNull(),
                     "lokr_factor": entry.choice.lokrFactor ?? NSNull(),
                     "attainable_rank": entry.choice.attainableRank, "parameters": entry.choice.parameters]
                },
            ]
            try JobOutput.printJSON(object)
            return
        }
        print(Self.table(AlgorithmSuggestion.blocks(plan), dtype: dtype).joined(separator: "\n"))
        print(String(format: "total: %d parameters, %.2f MB (%@), budget %d parameters\nevery layer reaches ≥ %.1f%% of its full rank",
                     plan.parameters, Double(plan.parameters * dtype.byteSize) / 1e6, dtype.rawValue, plan.budget, 100 * plan.target))
    }

    /// One row per block: name, layers, algorithm counts (`locon 12, loha 3, lokr 5`), attainable
    /// ranks, size. The algorithms column is as wide as its widest entry; block names are cut
    /// (`…` and their tail) so that a row fits 100 columns.
    static func table(_ blocks: [AlgorithmSuggestion.Block], dtype: DType) -> [String] {
        let algorithms = blocks.map { $0.algorithms.map { "\($0.key) \($0.value)" }.sorted().joined(separator: ", ") }
        let algorithmWidth = max("algorithms".count, algorithms.map(\.count).max() ?? 0)
        let nameWidth = min(max("block".count, blocks.map(\.name.count).max() ?? 0), 100 - 8 - 2 - algorithmWidth - 12 - 10)
        func pad(_ text: String, _ width: Int) -> String { text.padding(toLength: width, withPad: " ", startingAt: 0) }
        var lines = [pad("block", nameWidth) + "  layers  " + pad("algorithms", algorithmWidth) + "  " + pad("ranks", 10) + " size (MB)"]
        for (block, counts) in zip(blocks, algorithms) {
            let name = block.name.count > nameWidth ? "…" + block.name.suffix(nameWidth - 1) : Substring(block.name)
            lines.append(pad(String(name), nameWidth) + String(format: "  %6d  ", block.choices.count) + pad(counts, algorithmWidth)
                         + "  " + pad("\(block.ranks.lowerBound)–\(block.ranks.upperBound)", 10)
                         + String(format: " %9.2f", Double(block.parameters * dtype.byteSize) / 1e6))
        }
        return lines
    }
}
