import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// LoRA modules between kohya/LyCORIS files and Hugging Face PEFT's adapter folders
/// (`adapter_model.safetensors` + `adapter_config.json`), for one component of a checkpoint
/// (PEFT adapts one model: the UNet or a text encoder).
///
/// PEFT keys are `base_model.model.<module path>.lora_A.weight` = kohya's `lora_down`
/// (r, in[, kh, kw]) and `….lora_B.weight` = `lora_up` (out, r[, 1, 1]); PEFT's scale is
/// `lora_alpha / r`, the same as kohya's alpha/r. The config gives the most common rank and
/// alpha as `r`/`lora_alpha` and the others per module in `rank_pattern`/`alpha_pattern`,
/// with every module path in `target_modules`. Module paths are the component's own
/// (diffusers UNet paths, transformers CLIP paths), read from the ``CheckpointLayers``
/// table, so SDXL's LDM-named kohya modules map too. LoRA with a Tucker core, and other
/// algorithms, have no PEFT LoRA form and are reported as skipped.
public enum PEFTInterchange {
    public struct Report: Sendable {
        public var converted: [String] = []
        public var skipped: [(module: String, reason: String)] = []
    }

    static let keyPrefix = "base_model.model."

    /// The module path PEFT uses for a layer (its key in the component, without `.weight`).
    static func modulePath(_ layer: AdaptableLayer, in checkpoint: Checkpoint) -> String? {
        guard layer.rows == nil else { return nil }
        let key = checkpoint.layout == .diffusersFolder ? layer.weightKey : layer.otherLayoutKey ?? layer.weightKey
        return key.hasSuffix(".weight") ? String(key.dropLast(".weight".count)) : nil
    }

    /// kohya/LyCORIS file → PEFT folder `output` (created; must not exist).
    public static func export(adapter path: String, checkpoint checkpointPath: String, component: CheckpointComponent,
                              family: ModelFamily?, output: String) throws -> Report {
        let adapter = try AdapterFile(path: path)
        let checkpoint = try Checkpoint(path: checkpointPath)
        let table = try CheckpointLayers(checkpoint, family: family)
        var report = Report()
        var entries: [(path: String, rank: Int, alpha: Float, down: Tensor, up: Tensor)] = []
        for module in adapter.modules {
            guard let layer = table.layer(named: module.name), layer.component == component else {
                report.skipped.append((module.name, "no \(component.rawValue) layer of that name"))
                continue
            }
            let tensors = try adapter.tensors(of: module)
            guard module.algorithm == .locon || module.algorithm == .dylora, let down = tensors["lora_down.weight"],
                  let up = tensors["lora_up.weight"] else {
                report.skipped.append((module.name, "\(module.algorithm?.rawValue ?? "unknown") has no PEFT LoRA form"))
                continue
            }
            guard tensors["lora_mid.weight"] == nil else {
                report.skipped.append((module.name, "a Tucker core (lora_mid) has no PEFT LoRA form"))
                continue
            }
            guard let modulePath = modulePath(layer, in: checkpoint) else {
                report.skipped.append((module.name, "a row block of a fused tensor has no PEFT module"))
                continue
            }
            let rank = down.shape[0]
            let upShape = [up.shape[0], rank] + Array(repeating: 1, count: max(0, down.shape.count - 2))
            entries.append((modulePath, rank, module.alpha ?? Float(rank), down, up.reshaped(upShape)))
            report.converted.append(module.name)
        }
        guard !entries.isEmpty else { throw CheckpointError("\(path): no LoRA module of the \(component.rawValue) to export") }
        func mostCommon<T: Hashable>(_ values: [T]) -> T {
            Dictionary(grouping: values, by: { $0 }).max { $0.value.count < $1.value.count || ($0.value.count == $1.value.count && "\($0.key)" > "\($1.key)") }!.key
        }
        let rank = mostCommon(entries.map(\.rank)), alpha = mostCommon(entries.map(\.alpha))
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        for entry in entries {
            try writer.add(keyPrefix + entry.path + ".lora_A.weight", entry.down)
            try writer.add(keyPrefix + entry.path + ".lora_B.weight", entry.up)
        }
        let config: [String: Any] = [
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": entries.map(\.path),
            "rank_pattern": Dictionary(uniqueKeysWithValues: entries.filter { $0.rank != rank }.map { ($0.path, $0.rank) }),
            "alpha_pattern": Dictionary(uniqueKeysWithValues: entries.filter { $0.alpha != alpha }.map { ($0.path, $0.alpha) }),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
            "init_lora_weights": true, "task_type": NSNull(), "modules_to_save": NSNull(), "base_model_name_or_path": NSNull(),
        ]
        try writeFolder(output, writer: writer, config: config)
        return report
    }

    /// PEFT folder → kohya file: module paths named through the checkpoint's table.
    public static func `import`(peft folder: String, checkpoint checkpointPath: String, component: CheckpointComponent,
                                family: ModelFamily?, output: String) throws -> Report {
        let configData = try Data(contentsOf: URL(fileURLWithPath: folder + "/adapter_config.json"))
        guard let config = try JSONSerialization.jsonObject(with: configData) as? [String: Any],
              config["peft_type"] as? String == "LORA", let rank = config["r"] as? Int else {
            throw CheckpointError("\(folder)/adapter_config.json: not a PEFT LoRA config (peft_type LORA, r)")
        }
        let defaultAlpha = (config["lora_alpha"] as? NSNumber)?.floatValue ?? Float(rank)
        let alphas = (config["alpha_pattern"] as? [String: NSNumber]) ?? [:]
        let file = try SafetensorsFile(path: folder + "/adapter_model.safetensors")
        let checkpoint = try Checkpoint(path: checkpointPath)
        let table = try CheckpointLayers(checkpoint, family: family)
        var nameByPath: [String: String] = [:]
        for layer in table.layers where layer.component == component {
            if let path = modulePath(layer, in: checkpoint) { nameByPath[path] = layer.name }
        }
        var report = Report()
        var writer = SafetensorsWriter(metadata: ["ss_network_module": "networks.lora"])
        for info in file.tensors where info.name.hasSuffix(".lora_A.weight") {
            var path = String(info.name.dropLast(".lora_A.weight".count))
            if path.hasPrefix(keyPrefix) { path.removeFirst(keyPrefix.count) }
            guard let name = nameByPath[path] ?? nameByPath["text_model." + path] else {
                report.skipped.append((path, "no \(component.rawValue) layer at that path"))
                continue
            }
            let upKey = String(info.name.dropLast("lora_A.weight".count)) + "lora_B.weight"
            let down = try file.tensor(info.name), up = try file.tensor(upKey)
            try writer.add(name + ".lora_down.weight", down)
            try writer.add(name + ".lora_up.weight", up)
            try writer.add(name + ".alpha", Tensor(scalar: alphas[path]?.floatValue ?? defaultAlpha))
            report.converted.append(name)
        }
        try writer.write(toPath: output)
        return report
    }

    static func writeFolder(_ output: String, writer: SafetensorsWriter, config: [String: Any]) throws {
        let manager = FileManager.default
        guard !manager.fileExists(atPath: output) else { throw CheckpointError("\(output) exists; a PEFT folder is written to a new path") }
        let temporary = output + ".tmp-\(getpid())"
        try? manager.removeItem(atPath: temporary)
        do {
            try manager.createDirectory(atPath: temporary, withIntermediateDirectories: true)
            try writer.write(toPath: temporary + "/adapter_model.safetensors")
            let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
            try json.write(to: URL(fileURLWithPath: temporary + "/adapter_config.json"))
            try manager.moveItem(atPath: temporary, toPath: output)
        } catch {
            try? manager.removeItem(atPath: temporary)
            throw error
        }
    }
}
