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

    /// Parameters for `--budget`: `N` parameters, or `N[KB|MB|GB]` bytes ÷ the dtype's size.
    static func parameters(_ budget: String, dtype: DType) -> Int? {
        let units: [(String, Double)] = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)]
        let text = budget.uppercased()
        for (unit, scale) in units where text.hasSuffix(unit) {
            guard let value = Double(text.dropLast(unit.count)), value > 0 else { return nil }
            return Int(value * scale) / dtype.byteSize
        }
        return Int(text).flatMap { $0 > 0 ? $0 : nil }
    }

    func validate() throws {
        guard Self.parameters(budget, dtype: dtype) != nil else { throw ValidationError("--budget: '\(budget)' is not a size (10MB) or a count") }
    }

    func run() throws {
        let checkpoint = try Checkpoint(path: model)
        let table = try CheckpointLayers(checkpoint, family: modelType)
        let layers = table.layers.compactMap { layer -> AlgorithmSuggestion.Layer? in
            guard textEncoder || layer.component == .unet || layer.component == nil else { return nil }
            let shape = checkpoint.weightShape(of: layer)
            return shape.count == 2 || shape.count == 4 ? .init(name: layer.name, shape: shape) : nil
        }
        let plan = try AlgorithmSuggestion.plan(layers, budget: Self.parameters(budget, dtype: dtype)!)
        if json {
            let object: [String: Any] = [
                "budget": plan.budget, "parameters": plan.parameters, "bytes": plan.parameters * dtype.byteSize, "target": plan.target,
                "layers": plan.layers.map { entry -> [String: Any] in
                    ["name": entry.layer.name, "shape": entry.layer.shape, "algorithm": entry.choice.algorithm.rawValue,
                     "rank": entry.choice.rank, "factor": entry.choice.factor.map { [$0.0, $0.1] } ?? NSNull(),
                     "attainable_rank": entry.choice.attainableRank, "parameters": entry.choice.parameters]
                },
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("block".padding(toLength: 48, withPad: " ", startingAt: 0) + " layers  algorithms          ranks      size (MB)")
        var order: [String] = []
        var blocks: [String: [(AlgorithmSuggestion.Layer, AlgorithmSuggestion.Choice)]] = [:]
        for (layer, choice) in plan.layers {
            let block = Self.block(of: layer.name)
            if blocks[block] == nil { order.append(block) }
            blocks[block, default: []].append((layer, choice))
        }
        for block in order {
            let entries = blocks[block]!
            let counts = Dictionary(grouping: entries, by: { $0.1.algorithm.rawValue }).map { "\($0.key) \($0.value.count)" }.sorted()
            let ranks = entries.map(\.1.attainableRank)
            let size = Double(entries.reduce(0) { $0 + $1.1.parameters } * dtype.byteSize) / 1e6
            print(block.padding(toLength: 48, withPad: " ", startingAt: 0) + String(format: " %6d  ", entries.count)
                  + counts.joined(separator: ", ").padding(toLength: 18, withPad: " ", startingAt: 0)
                  + "\(ranks.min()!)–\(ranks.max()!)".padding(toLength: 10, withPad: " ", startingAt: 0) + String(format: " %9.2f", size))
        }
        print(String(format: "total: %d parameters, %.2f MB (%@), budget %d parameters; every layer reaches ≥ %.1f%% of its full rank",
                     plan.parameters, Double(plan.parameters * dtype.byteSize) / 1e6, dtype.rawValue, plan.budget, 100 * plan.target))
    }

    /// The kohya name up to its block index (`lora_unet_down_blocks_1`, `lora_te_text_model_encoder_layers_3`, …).
    static func block(of name: String) -> String {
        let parts = name.split(separator: "_")
        for (index, part) in parts.enumerated() where Int(part) != nil {
            return parts[...index].joined(separator: "_")
        }
        return name
    }
}
