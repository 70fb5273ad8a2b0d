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
    @Flag(help: "Print the plan as JSON, every layer.") var json = false

    func validate() throws {
        guard AlgorithmSuggestion.parameters(budget: budget, dtype: dtype) != nil else { throw ValidationError("--budget: '\(budget)' is not a size (10MB) or a count") }
    }

    func run() throws {
        let checkpoint = try Checkpoint(path: model)
        let table = try CheckpointLayers(checkpoint, family: modelType)
        let layers = table.layers.compactMap { layer -> AlgorithmSuggestion.Layer? in
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
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("block".padding(toLength: 48, withPad: " ", startingAt: 0) + " layers  algorithms          ranks      size (MB)")
        for block in AlgorithmSuggestion.blocks(plan) {
            let counts = block.algorithms.map { "\($0.key) \($0.value)" }.sorted()
            let size = Double(block.parameters * dtype.byteSize) / 1e6
            print(block.name.padding(toLength: 48, withPad: " ", startingAt: 0) + String(format: " %6d  ", block.choices.count)
                  + counts.joined(separator: ", ").padding(toLength: 18, withPad: " ", startingAt: 0)
                  + "\(block.ranks.lowerBound)–\(block.ranks.upperBound)".padding(toLength: 10, withPad: " ", startingAt: 0)
                  + String(format: " %9.2f", size))
        }
        print(String(format: "total: %d parameters, %.2f MB (%@), budget %d parameters; every layer reaches ≥ %.1f%% of its full rank",
                     plan.parameters, Double(plan.parameters * dtype.byteSize) / 1e6, dtype.rawValue, plan.budget, 100 * plan.target))
    }
}
