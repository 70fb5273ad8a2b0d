/// The two spellings of a Stable Diffusion UNet's tensor keys — the original LDM layout
/// (`input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`, what single-file checkpoints
/// and kohya's SDXL names use) and diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0
/// .attn1.to_q.weight`, what diffusers folders and kohya's SD1/SD2 names use) — and the
/// conversion between them, key by key. Keys here carry no `model.diffusion_model.` prefix.
///
/// SD1.x, SD2.x and SDXL all have two ResNets per down level (``layersPerBlock``), so LDM's
/// flat block indices map as:
/// - `input_blocks.0.0` = `conv_in`; `input_blocks.{1+3i+j}.{0|1}` = `down_blocks.i.{resnets|attentions}.j`
///   (j < 2); `input_blocks.{3+3i}.0.op` = `down_blocks.i.downsamplers.0.conv`;
/// - `middle_block.{0|1|2}` = `mid_block.{resnets.0|attentions.0|resnets.1}`;
/// - `output_blocks.{3i+j}.{0|1}` = `up_blocks.i.{resnets|attentions}.j` (j < 3); the upsampler
///   `up_blocks.i.upsamplers.0.conv` is `output_blocks.{3i+2}.2.conv` when level i has
///   attentions, `output_blocks.{3i+2}.1.conv` when not;
/// - `time_embed.{0|2}` = `time_embedding.linear_{1|2}`, `label_emb.0.{0|2}` (SDXL) =
///   `add_embedding.linear_{1|2}`, `out.{0|2}` = `conv_norm_out`/`conv_out`;
/// - inside a ResNet `in_layers.0`/`in_layers.2`/`emb_layers.1`/`out_layers.0`/`out_layers.3`/
///   `skip_connection` = `norm1`/`conv1`/`time_emb_proj`/`norm2`/`conv2`/`conv_shortcut`;
///   inside an attention block both spell the same.
///
/// This is the mapping of diffusers' `convert_ldm_unet_checkpoint` (checked against it by
/// the Python tests) and of A1111's kohya-name conversion.
public struct UNetNaming: Sendable {
    /// ResNets per down level in every SD family (LDM `num_res_blocks`).
    public static let layersPerBlock = 2

    /// The up levels that have attention blocks (decides the upsampler's LDM index).
    public var upLevelsWithAttention: Set<Int>

    public init(upLevelsWithAttention: Set<Int>) {
        self.upLevelsWithAttention = upLevelsWithAttention
    }

    /// Reads the up levels with attentions from a UNet's keys in either layout.
    public init(keys: some Sequence<String>) {
        var levels: Set<Int> = []
        for key in keys {
            let parts = key.split(separator: ".")
            if parts.count > 3, parts[0] == "up_blocks", parts[2] == "attentions", let level = Int(parts[1]) {
                levels.insert(level)
            } else if parts.count > 3, parts[0] == "output_blocks", parts[2] == "1", parts[3] != "conv", let block = Int(parts[1]) {
                levels.insert(block / (Self.layersPerBlock + 1))
            }
        }
        upLevelsWithAttention = levels
    }

    private static let resnetRenames: [(ldm: [String], diffusers: String)] = [
        (["in_layers", "0"], "norm1"), (["in_layers", "2"], "conv1"), (["emb_layers", "1"], "time_emb_proj"),
        (["out_layers", "0"], "norm2"), (["out_layers", "3"], "conv2"), (["skip_connection"], "conv_shortcut"),
    ]
    private static let topLevel: [(ldm: [String], diffusers: [String])] = [
        (["time_embed", "0"], ["time_embedding", "linear_1"]), (["time_embed", "2"], ["time_embedding", "linear_2"]),
        (["label_emb", "0", "0"], ["add_embedding", "linear_1"]), (["label_emb", "0", "2"], ["add_embedding", "linear_2"]),
        (["input_blocks", "0", "0"], ["conv_in"]), (["out", "0"], ["conv_norm_out"]), (["out", "2"], ["conv_out"]),
    ]

    /// The diffusers key of an LDM UNet key (nil when the key is not part of an SD UNet).
    public func diffusersKey(ldm key: String) -> String? {
        let parts = key.split(separator: ".").map(String.init)
        for (ldm, diffusers) in Self.topLevel where parts.starts(with: ldm) && parts.count > ldm.count {
            return (diffusers + parts[ldm.count...]).joined(separator: ".")
        }
        guard parts.count > 3, let block = Int(parts[1]) else { return nil }
        let kind = parts[2], rest = Array(parts[3...])
        let per = Self.layersPerBlock + 1
        switch parts[0] {
        case "input_blocks" where block > 0:
            let (level, index) = ((block - 1) / per, (block - 1) % per)
            if kind == "0", rest.first == "op" { return (["down_blocks", "\(level)", "downsamplers", "0", "conv"] + rest.dropFirst()).joined(separator: ".") }
            if index == Self.layersPerBlock { return nil }
            if kind == "0" { return Self.resnet(["down_blocks", "\(level)", "resnets", "\(index)"], rest) }
            if kind == "1" { return (["down_blocks", "\(level)", "attentions", "\(index)"] + rest).joined(separator: ".") }
        case "middle_block":
            switch block {
            case 0, 2: return kind.isEmpty ? nil : Self.resnet(["mid_block", "resnets", "\(block / 2)"], [kind] + rest)
            case 1: return (["mid_block", "attentions", "0", kind] + rest).joined(separator: ".")
            default: return nil
            }
        case "output_blocks":
            let (level, index) = (block / per, block % per)
            if kind == "0" { return Self.resnet(["up_blocks", "\(level)", "resnets", "\(index)"], rest) }
            // An attention block has no child named `conv`, so `.1.conv`/`.2.conv` is the upsampler.
            if rest.first == "conv", index == Self.layersPerBlock, kind == "1" || kind == "2" {
                return (["up_blocks", "\(level)", "upsamplers", "0"] + rest).joined(separator: ".")
            }
            if kind == "1", rest.first != "conv" { return (["up_blocks", "\(level)", "attentions", "\(index)"] + rest).joined(separator: ".") }
        default: break
        }
        return nil
    }

    /// The LDM key of a diffusers UNet key (nil when the key is not part of an SD UNet).
    public func ldmKey(diffusers key: String) -> String? {
        let parts = key.split(separator: ".").map(String.init)
        for (ldm, diffusers) in Self.topLevel where parts.starts(with: diffusers) && parts.count > diffusers.count {
            return (ldm + parts[diffusers.count...]).joined(separator: ".")
        }
        let per = Self.layersPerBlock + 1
        if parts.count > 4, parts[0] == "mid_block", let index = Int(parts[2]) {
            switch parts[1] {
            case "resnets" where index < 2: return Self.ldmResnet(["middle_block", "\(2 * index)"], Array(parts[3...]))
            case "attentions" where index == 0: return (["middle_block", "1"] + parts[3...]).joined(separator: ".")
            default: return nil
            }
        }
        guard parts.count > 4, let level = Int(parts[1]), let index = Int(parts[3]) else { return nil }
        let rest = Array(parts[4...])
        switch (parts[0], parts[2]) {
        case ("down_blocks", "resnets") where index < Self.layersPerBlock:
            return Self.ldmResnet(["input_blocks", "\(1 + per * level + index)", "0"], rest)
        case ("down_blocks", "attentions") where index < Self.layersPerBlock:
            return (["input_blocks", "\(1 + per * level + index)", "1"] + rest).joined(separator: ".")
        case ("down_blocks", "downsamplers") where index == 0 && rest.first == "conv":
            return (["input_blocks", "\(per * (level + 1))", "0", "op"] + rest.dropFirst()).joined(separator: ".")
        case ("up_blocks", "resnets") where index < per:
            return Self.ldmResnet(["output_blocks", "\(per * level + index)", "0"], rest)
        case ("up_blocks", "attentions") where index < per:
            return (["output_blocks", "\(per * level + index)", "1"] + rest).joined(separator: ".")
        case ("up_blocks", "upsamplers") where index == 0:
            let slot = upLevelsWithAttention.contains(level) ? "2" : "1"
            return (["output_blocks", "\(per * level + Self.layersPerBlock)", slot] + rest).joined(separator: ".")
        default: return nil
        }
    }

    private static func resnet(_ head: [String], _ rest: [String]) -> String? {
        for (ldm, diffusers) in resnetRenames where rest.starts(with: ldm) && rest.count > ldm.count {
            return (head + [diffusers] + rest[ldm.count...]).joined(separator: ".")
        }
        return nil
    }

    private static func ldmResnet(_ head: [String], _ rest: [String]) -> String? {
        guard let first = rest.first, rest.count > 1,
              let rename = resnetRenames.first(where: { $0.diffusers == first }) else { return nil }
        return (head + rename.ldm + rest.dropFirst()).joined(separator: ".")
    }
}
