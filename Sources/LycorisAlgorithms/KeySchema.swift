/// How adapter modules and their tensors are named in files — the one place for the key
/// schema that A1111, ComfyUI, kohya sd-scripts and LyCORIS share.
///
/// A key is `<module>.<suffix>`: the module name has no dots (a model path with `.`
/// replaced by `_`, behind a prefix), the suffix is the algorithm's tensor name
/// (`lora_up.weight`, `hada_w1_a`, `alpha`, …).
public enum KeySchema {
    /// UNet modules (kohya, A1111, ComfyUI).
    public static let unetPrefix = "lora_unet_"
    /// The single text encoder of SD1/SD2.
    public static let textEncoderPrefix = "lora_te_"
    /// SDXL's first and second text encoders.
    public static let textEncoder1Prefix = "lora_te1_"
    public static let textEncoder2Prefix = "lora_te2_"
    /// LyCORIS's generic wrapper (`create_lycoris`).
    public static let genericPrefix = "lycoris_"

    /// Every known prefix, longest first so `lora_te1_` wins over `lora_te_`.
    public static let prefixes = [textEncoder1Prefix, textEncoder2Prefix, unetPrefix, textEncoderPrefix, genericPrefix]

    /// The module name for a model path: `prefix + path` with dots replaced by underscores
    /// (`down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`).
    public static func moduleName(prefix: String, path: String) -> String {
        prefix + path.replacingOccurrences(of: ".", with: "_")
    }

    /// Splits a file key into module name and suffix at the first dot.
    public static func split(key: String) -> (module: String, suffix: String)? {
        guard let dot = key.firstIndex(of: "."), dot != key.startIndex else { return nil }
        let suffix = key[key.index(after: dot)...]
        return suffix.isEmpty ? nil : (String(key[..<dot]), String(suffix))
    }

    /// The key of a module's tensor.
    public static func key(module: String, suffix: String) -> String { "\(module).\(suffix)" }

    /// The module name without its known prefix, and the prefix (nil when none matches).
    public static func stripPrefix(_ module: String) -> (prefix: String?, path: String) {
        for prefix in prefixes where module.hasPrefix(prefix) {
            return (prefix, String(module.dropFirst(prefix.count)))
        }
        return (nil, module)
    }

    /// The flattened form of a state-dict weight key, as module names spell it:
    /// `a.b.c.weight` → `a_b_c` (nil for keys not ending in `.weight`).
    public static func flattenedModulePath(ofWeightKey key: String) -> String? {
        guard key.hasSuffix(".weight") else { return nil }
        return String(key.dropLast(".weight".count)).replacingOccurrences(of: ".", with: "_")
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: Character, with replacement: Character) -> String {
        String(map { $0 == target ? replacement : $0 })
    }
}
