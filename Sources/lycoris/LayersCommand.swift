import ArgumentParser
import Foundation
import LycorisCheckpoints

extension ModelFamily: ExpressibleByArgument {}

/// `lycoris layers CKPT [--model-type sd1|sd2|sdxl] [--json]`: the checkpoint's family and
/// layout, and every adaptable layer with its kohya name and where its weight is.
struct LayersCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "layers",
        abstract: "List a checkpoint's adaptable layers with their kohya module names (single file or diffusers folder).")

    @Argument(help: "A .safetensors checkpoint or a diffusers folder.") var checkpoint: String
    @Option(help: "The model family, when detection from the keys is not wanted (sd1, sd2, sdxl).") var modelType: ModelFamily?
    @Flag(help: "Print JSON instead of a table.") var json = false

    func run() throws {
        let opened = try Checkpoint(path: checkpoint)
        let table = try CheckpointLayers(opened, family: modelType)
        if json {
            let data = try JSONSerialization.data(withJSONObject: Self.jsonObject(opened, table), options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("\(checkpoint): \(opened.layout.rawValue), family \(table.family?.rawValue ?? "none (plain state dict)"), \(table.layers.count) layers")
        print("names: \(table.namingDescription)")
        let width = min(72, table.layers.map(\.name.count).max() ?? 0)
        for layer in table.layers {
            let shape = opened.weightShape(of: layer).map(String.init).joined(separator: "x")
            print(layer.name.padding(toLength: max(width, layer.name.count), withPad: " ", startingAt: 0) + " " + shape)
        }
    }

    static func jsonObject(_ checkpoint: Checkpoint, _ table: CheckpointLayers) -> [String: Any] {
        [
            "family": table.family?.rawValue ?? NSNull(), "layout": checkpoint.layout.rawValue,
            "layers": table.layers.map { layer -> [String: Any] in
                [
                    "name": layer.name, "aliases": layer.aliases, "component": layer.component?.rawValue ?? NSNull(),
                    "file": checkpoint.parts[layer.part].relativePath, "key": layer.weightKey,
                    "bias": layer.biasKey ?? NSNull(), "bias_file": layer.biasPart.map { checkpoint.parts[$0].relativePath } ?? NSNull(), "rows": layer.rows.map { [$0.lowerBound, $0.upperBound] } ?? NSNull(),
                    "shape": checkpoint.weightShape(of: layer), "other_key": layer.otherLayoutKey ?? NSNull(),
                ]
            },
        ]
    }
}
