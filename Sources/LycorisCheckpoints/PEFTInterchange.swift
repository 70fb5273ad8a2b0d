import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// LoRA, LoHa and LoKr modules between kohya/LyCORIS files and Hugging Face PEFT's adapter
/// folders (`adapter_model.safetensors` + `adapter_config.json`), for one component of a
/// checkpoint (PEFT adapts one model: the UNet or a text encoder).
///
/// Keys are `base_model.model.<module path>.<name>`. LoRA: `lora_A.weight` = kohya's
/// `lora_down` (r, in[, kh, kw]), `lora_B.weight` = `lora_up` (out, r[, 1, 1]), scale
/// `lora_alpha / r` (√r with `use_rslora`) as kohya's alpha/r; a Tucker core has no PEFT
/// form. LoHa and LoKr keep LyCORIS's tensor names and shapes (`hada_w1_a`, …, `lokr_w1`,
/// …) under `alpha`/`r`; what one PEFT config can hold and the r/alpha each module gets are
/// ``PEFTLycorisConfig``'s. The config gives the most common r and alpha, the others per
/// module in `rank_pattern`/`alpha_pattern`, every module path in `target_modules`. A folder
/// has one PEFT type: the algorithm of most of the component's modules; the others, and
/// modules with tensors PEFT has no place for (DoRA's `dora_scale`, `scalar`), are reported
/// as skipped. Module paths are the component's own (diffusers UNet paths, transformers
/// CLIP paths), read from the ``CheckpointLayers`` table, so SDXL's LDM-named kohya modules
/// map too.
public enum PEFTInterchange {
    public struct Report: Sendable {
        public var converted: [String] = []
        public var skipped: [(module: String, reason: String)] = []
        /// The folder's PEFT type (LORA, LOHA, LOKR).
        public var peftType = ""
    }

    static let keyPrefix = "base_model.model."

    /// PEFT's adapter types and the LyCORIS algorithm of each.
    enum PEFTType: String, CaseIterable {
        case lora = "LORA", loha = "LOHA", lokr = "LOKR"

        init?(_ algorithm: Algorithm) {
            switch algorithm {
            case .locon, .dylora: self = .lora
            case .loha: self = .loha
            case .lokr: self = .lokr
            default: return nil
            }
        }

        /// Tensor names as PEFT spells them, after the module path.
        var suffixes: [String] {
            switch self {
            case .lora: ["lora_A.weight", "lora_B.weight"]
            case .loha: ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"]
            case .lokr: ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]
            }
        }

        /// The config's alpha field.
        var alphaKey: String { self == .lora ? "lora_alpha" : "alpha" }
    }

    /// The module path PEFT uses for a layer (its key in the diffusers/transformers model,
    /// without `.weight`): a single file's layers through their other-layout key, which for
    /// a third of OpenCLIP's fused `in_proj` is the transformers `q_proj`/`k_proj`/`v_proj`.
    static func modulePath(_ layer: AdaptableLayer, in checkpoint: Checkpoint) -> String? {
        let key = checkpoint.layout == .diffusersFolder ? layer.weightKey : layer.otherLayoutKey ?? layer.weightKey
        guard layer.rows == nil || key != layer.weightKey, key.hasSuffix(".weight") else { return nil }
        return String(key.dropLast(".weight".count))
    }

    /// One module ready for the folder: its PEFT r, alpha and tensors by PEFT name.
    struct Entry {
        var path: String
        var rank: Int
        var alpha: Float
        var tensors: [(String, Tensor)]
    }

    /// A module of the component with a PEFT type, before the folder's settings are chosen.
    struct Candidate {
        var name: String
        var path: String
        var type: PEFTType
        var alpha: Float?
        var tensors: [String: Tensor]
        var weightShape: [Int]
    }

    /// kohya/LyCORIS file → PEFT folder `output` (created; must not exist).
    public static func export(adapter path: String, checkpoint checkpointPath: String, component: CheckpointComponent,
                              family: ModelFamily?, output: String) throws -> Report {
        let adapter = try AdapterFile(path: path)
        let checkpoint = try Checkpoint(path: checkpointPath)
        let table = try CheckpointLayers(checkpoint, family: family)
        var report = Report()
        var candidates: [Candidate] = []
        for module in adapter.modules {
            guard let layer = table.layer(named: module.name), layer.component == component else {
                report.skipped.append((module.name, "no \(component.rawValue) layer of that name"))
                continue
            }
            guard let algorithm = module.algorithm, let type = PEFTType(algorithm) else {
                report.skipped.append((module.name, "\(module.algorithm?.rawValue ?? "unknown") has no PEFT form (LoRA, LoHa, LoKr)"))
                continue
            }
            guard let modulePath = modulePath(layer, in: checkpoint) else {
                report.skipped.append((module.name, "a row block of a fused tensor has no PEFT module"))
                continue
            }
            let tensors = try adapter.tensors(of: module)
            let known = Set(["alpha", "lora_down.weight", "lora_up.weight", "lora_mid.weight"] + PEFTType.loha.suffixes + PEFTType.lokr.suffixes)
            if let extra = tensors.keys.sorted().first(where: { !known.contains($0) }) {
                report.skipped.append((module.name, "\(extra) has no place in a PEFT \(type.rawValue) adapter"))
                continue
            }
            candidates.append(Candidate(name: module.name, path: modulePath, type: type, alpha: module.alpha, tensors: tensors,
                                        weightShape: checkpoint.weightShape(of: layer)))
        }
        guard !candidates.isEmpty else {
            throw CheckpointError("\(path): no LoRA, LoHa or LoKr module of the \(component.rawValue) to export")
        }
        let type = mostCommon(candidates.map(\.type))
        report.peftType = type.rawValue
        for candidate in candidates where candidate.type != type {
            report.skipped.append((candidate.name, "a PEFT folder has one type: this one is \(type.rawValue)"))
        }
        let chosen = candidates.filter { $0.type == type }
        var config: [String: Any]
        var entries: [Entry] = []
        func take(_ candidate: Candidate, _ entry: Entry?, otherwise reason: String) {
            if let entry {
                entries.append(entry)
                report.converted.append(candidate.name)
            } else {
                report.skipped.append((candidate.name, reason))
            }
        }
        switch type {
        case .lora:
            for candidate in chosen {
                take(candidate, loraEntry(candidate), otherwise: "a Tucker core (lora_mid) has no PEFT LoRA form")
            }
            config = ["lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
                      "init_lora_weights": true]
        case .loha:
            let effective = PEFTLycorisConfig.lohaEffectiveConv2d(chosen.map { candidate in
                (candidate.tensors["hada_t1"] != nil, candidate.weightShape.dropFirst(2).contains { $0 != 1 })
            })
            for candidate in chosen {
                let spatial = candidate.weightShape.dropFirst(2).contains { $0 != 1 }
                let fits = !spatial || (candidate.tensors["hada_t1"] != nil) == effective
                take(candidate, fits ? lohaEntry(candidate) : nil,
                     otherwise: "the folder's use_effective_conv2d is \(effective); this conv needs \(!effective)")
            }
            config = ["rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": effective, "init_weights": true]
        case .lokr:
            let geometries = chosen.map { PEFTLycorisConfig.LoKrGeometry(tensors: $0.tensors, weightShape: $0.weightShape) }
            let settings = PEFTLycorisConfig.bestSettings(geometries.compactMap { $0 })
            for (candidate, geometry) in zip(chosen, geometries) {
                let entry = geometry.flatMap { geometry in
                    PEFTLycorisConfig.rank(of: geometry, under: settings).map { rank in
                        Entry(path: candidate.path, rank: rank, alpha: geometry.lycorisScale(alpha: candidate.alpha) * Float(rank),
                              tensors: candidate.tensors.filter { $0.key != "alpha" }.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
                    }
                }
                take(candidate, entry, otherwise: "its factors need another decompose_factor, decompose_both or "
                     + "use_effective_conv2d than the folder's (\(settings.decomposeFactor), \(settings.decomposeBoth), \(settings.effectiveConv2d))")
            }
            config = ["rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": settings.effectiveConv2d,
                      "decompose_both": settings.decomposeBoth, "decompose_factor": settings.decomposeFactor,
                      "rank_dropout_scale": false, "init_weights": true]
        }
        guard !entries.isEmpty else { throw CheckpointError("\(path): no module of the \(component.rawValue) has a PEFT form") }
        let rank = mostCommon(entries.map(\.rank)), alpha = mostCommon(entries.map(\.alpha))
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        for entry in entries {
            for (name, tensor) in entry.tensors { try writer.add(keyPrefix + entry.path + "." + name, tensor) }
        }
        config.merge([
            "peft_type": type.rawValue, "r": rank, type.alphaKey: alpha, "target_modules": entries.map(\.path),
            "rank_pattern": Dictionary(uniqueKeysWithValues: entries.filter { $0.rank != rank }.map { ($0.path, $0.rank) }),
            "alpha_pattern": Dictionary(uniqueKeysWithValues: entries.filter { $0.alpha != alpha }.map { ($0.path, $0.alpha) }),
            "task_type": NSNull(), "modules_to_save": NSNull(), "base_model_name_or_path": NSNull(),
        ]) { _, new in new }
        try writeFolder(output, writer: writer, config: config)
        return report
    }

    /// LoRA: `lora_down` → `lora_A.weight`, `lora_up` → `lora_B.weight` (N-D like lora_A);
    /// nil for a Tucker core.
    static func loraEntry(_ candidate: Candidate) -> Entry? {
        guard candidate.tensors["lora_mid.weight"] == nil, let down = candidate.tensors["lora_down.weight"],
              let up = candidate.tensors["lora_up.weight"] else { return nil }
        let rank = down.shape[0]
        let upShape = [up.shape[0], rank] + Array(repeating: 1, count: max(0, down.shape.count - 2))
        return Entry(path: candidate.path, rank: rank, alpha: effectiveAlpha(candidate.alpha, rank: rank),
                     tensors: [("lora_A.weight", down), ("lora_B.weight", up.reshaped(upShape))])
    }

    /// LoHa: the tensors as they are; PEFT alpha = LyCORIS alpha.
    static func lohaEntry(_ candidate: Candidate) -> Entry? {
        guard let rank = candidate.tensors["hada_w1_b"]?.shape.first else { return nil }
        return Entry(path: candidate.path, rank: rank, alpha: effectiveAlpha(candidate.alpha, rank: rank),
                     tensors: PEFTType.loha.suffixes.compactMap { name in candidate.tensors[name].map { (name, $0) } })
    }

    /// LyCORIS's alpha: nil or 0 means the rank.
    static func effectiveAlpha(_ alpha: Float?, rank: Int) -> Float { (alpha ?? 0) == 0 ? Float(rank) : alpha! }

    static func mostCommon<T: Hashable>(_ values: [T]) -> T {
        Dictionary(grouping: values, by: { $0 }).max { $0.value.count < $1.value.count || ($0.value.count == $1.value.count && "\($0.key)" > "\($1.key)") }!.key
    }

    /// PEFT folder → kohya file: module paths named through the checkpoint's table; each
    /// module's scale kept (LoKr with both halves whole, which LyCORIS scales by 1: the
    /// scale multiplied into `lokr_w1`).
    public static func `import`(peft folder: String, checkpoint checkpointPath: String, component: CheckpointComponent,
                                family: ModelFamily?, output: String) throws -> Report {
        let configData = try Data(contentsOf: URL(fileURLWithPath: folder + "/adapter_config.json"))
        guard let config = try JSONSerialization.jsonObject(with: configData) as? [String: Any],
              let type = (config["peft_type"] as? String).flatMap(PEFTType.init(rawValue:)), let defaultRank = config["r"] as? Int else {
            throw CheckpointError("\(folder)/adapter_config.json: not a PEFT LoRA, LoHa or LoKr config (peft_type, r)")
        }
        let defaultAlpha = (config[type.alphaKey] as? NSNumber)?.floatValue ?? Float(defaultRank)
        let ranks = (config["rank_pattern"] as? [String: NSNumber]) ?? [:]
        let alphas = (config["alpha_pattern"] as? [String: NSNumber]) ?? [:]
        let rsLoRA = type == .lora && (config["use_rslora"] as? Bool ?? false)
        let file = try SafetensorsFile(path: folder + "/adapter_model.safetensors")
        let checkpoint = try Checkpoint(path: checkpointPath)
        let table = try CheckpointLayers(checkpoint, family: family)
        var nameByPath: [String: String] = [:]
        for layer in table.layers where layer.component == component {
            if let path = modulePath(layer, in: checkpoint) { nameByPath[path] = layer.name }
        }
        var modules: [String: [String: String]] = [:], order: [String] = []
        for info in file.tensors {
            guard let suffix = type.suffixes.first(where: { info.name.hasSuffix("." + $0) }) else { continue }
            var path = String(info.name.dropLast(suffix.count + 1))
            if path.hasPrefix(keyPrefix) { path.removeFirst(keyPrefix.count) }
            if modules[path] == nil { order.append(path) }
            modules[path, default: [:]][suffix] = info.name
        }
        var report = Report()
        report.peftType = type.rawValue
        let metadata = type == .lora ? ["ss_network_module": "networks.lora"]
            : ["ss_network_module": "lycoris.kohya", "ss_network_args": "{\"algo\": \"\(type == .loha ? "loha" : "lokr")\"}"]
        var writer = SafetensorsWriter(metadata: metadata)
        for path in order {
            guard let name = nameByPath[path] ?? nameByPath["text_model." + path] else {
                report.skipped.append((path, "no \(component.rawValue) layer at that path"))
                continue
            }
            var tensors: [String: Tensor] = [:]
            for (suffix, key) in modules[path]! { tensors[suffix] = try file.tensor(key) }
            let r = patternValue(ranks, path)?.intValue ?? defaultRank
            let alpha = patternValue(alphas, path)?.floatValue ?? defaultAlpha
            let scale = alpha / (rsLoRA ? Float(r).squareRoot() : Float(r))
            var out: [(String, Tensor)]
            var rank: Int?
            switch type {
            case .lora:
                guard let down = tensors["lora_A.weight"], let up = tensors["lora_B.weight"] else {
                    report.skipped.append((path, "lora_A.weight or lora_B.weight missing"))
                    continue
                }
                out = [("lora_down.weight", down), ("lora_up.weight", up)]
                rank = down.shape.first
            case .loha:
                out = PEFTType.loha.suffixes.compactMap { suffix in tensors[suffix].map { (suffix, $0) } }
                rank = tensors["hada_w1_b"]?.shape.first
            case .lokr:
                rank = tensors["lokr_w1_b"]?.shape.first ?? tensors["lokr_w2_b"]?.shape.first
                if rank == nil, let w1 = tensors["lokr_w1"] { tensors["lokr_w1"] = w1 * scale }
                out = PEFTType.lokr.suffixes.compactMap { suffix in tensors[suffix].map { (suffix, $0) } }
            }
            for (suffix, tensor) in out { try writer.add(name + "." + suffix, tensor) }
            try writer.add(name + ".alpha", Tensor(scalar: rank.map { scale * Float($0) } ?? 1))
            report.converted.append(name)
        }
        try writer.write(toPath: output)
        return report
    }

    /// A `rank_pattern`/`alpha_pattern` value for a module path: the exact key, else the
    /// first key matching as PEFT matches them (the path ends with `.<key>` or is it).
    static func patternValue(_ patterns: [String: NSNumber], _ path: String) -> NSNumber? {
        if let exact = patterns[path] { return exact }
        for (key, value) in patterns.sorted(by: { $0.key < $1.key }) {
            if let regex = try? Regex("(.*\\.)?(\(key))"), (try? regex.wholeMatch(in: path)) != nil { return value }
        }
        return nil
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
