/// The two spellings of a CLIP text encoder's tensor keys: OpenCLIP's (SD2's
/// `cond_stage_model.model.` and SDXL's second encoder `conditioner.embedders.1.model.`) and
/// Hugging Face transformers' `CLIPTextModel` (diffusers folders, SD1 single files, and every
/// kohya `lora_te*_` name). Keys here carry no checkpoint prefix.
///
/// | OpenCLIP | transformers |
/// |---|---|
/// | `transformer.resblocks.N.attn.in_proj_weight` [3d, d] | `text_model.encoder.layers.N.self_attn.{q,k,v}_proj.weight`, rows `[0,d)`, `[d,2d)`, `[2d,3d)` |
/// | `….attn.in_proj_bias` [3d] | `….self_attn.{q,k,v}_proj.bias`, the same thirds |
/// | `….attn.out_proj.*` | `….self_attn.out_proj.*` |
/// | `….ln_1.*`, `….ln_2.*` | `….layer_norm1.*`, `….layer_norm2.*` |
/// | `….mlp.c_fc.*`, `….mlp.c_proj.*` | `….mlp.fc1.*`, `….mlp.fc2.*` |
/// | `ln_final.*` | `text_model.final_layer_norm.*` |
///
/// Embeddings and `text_projection` (stored transposed by OpenCLIP) are not adaptable layers
/// and are not named here. This is diffusers' `convert_open_clip_checkpoint` mapping.
public enum TextEncoderNaming {
    /// One transformers tensor inside an OpenCLIP tensor: the whole tensor, or a block of rows.
    public struct Slice: Sendable, Equatable {
        public var key: String
        /// The rows of the OpenCLIP tensor (nil: all of it).
        public var rows: Range<Int>?

        public init(key: String, rows: Range<Int>?) {
            self.key = key
            self.rows = rows
        }
    }

    private static let renames: [(openCLIP: [String], transformers: [String])] = [
        (["attn", "out_proj"], ["self_attn", "out_proj"]), (["ln_1"], ["layer_norm1"]), (["ln_2"], ["layer_norm2"]),
        (["mlp", "c_fc"], ["mlp", "fc1"]), (["mlp", "c_proj"], ["mlp", "fc2"]),
    ]

    /// The transformers tensors of an OpenCLIP key: three row blocks for a fused `in_proj`
    /// of `rows` rows, one whole tensor otherwise; empty when the key is not an adaptable
    /// layer's weight or bias.
    public static func transformersSlices(openCLIP key: String, rows: Int) -> [Slice] {
        let parts = key.split(separator: ".").map(String.init)
        if parts.count == 2, parts[0] == "ln_final" {
            return [Slice(key: "text_model.final_layer_norm.\(parts[1])", rows: nil)]
        }
        guard parts.count >= 5, parts[0] == "transformer", parts[1] == "resblocks", let layer = Int(parts[2]) else { return [] }
        let head = "text_model.encoder.layers.\(layer)."
        let rest = Array(parts[3...])
        if rest == ["attn", "in_proj_weight"] || rest == ["attn", "in_proj_bias"] {
            guard rows % 3 == 0 else { return [] }
            let size = rows / 3, kind = rest[1] == "in_proj_weight" ? "weight" : "bias"
            return ["q", "k", "v"].enumerated().map { index, name in
                Slice(key: "\(head)self_attn.\(name)_proj.\(kind)", rows: index * size..<(index + 1) * size)
            }
        }
        for (openCLIP, transformers) in renames where rest.count == openCLIP.count + 1 && rest.starts(with: openCLIP) {
            return [Slice(key: head + (transformers + [rest.last!]).joined(separator: "."), rows: nil)]
        }
        return []
    }

    /// The OpenCLIP key holding a transformers key, and which third of it for `q/k/v_proj`
    /// (0, 1, 2); nil when the key is not an adaptable layer's weight or bias.
    public static func openCLIPKey(transformers key: String) -> (key: String, third: Int?)? {
        let parts = key.split(separator: ".").map(String.init)
        if parts.count == 3, parts[0] == "text_model", parts[1] == "final_layer_norm" { return ("ln_final.\(parts[2])", nil) }
        guard parts.count >= 6, parts.starts(with: ["text_model", "encoder", "layers"]), let layer = Int(parts[3]) else { return nil }
        let head = "transformer.resblocks.\(layer)."
        let rest = Array(parts[4...])
        if rest.count == 3, rest[0] == "self_attn", let third = ["q_proj", "k_proj", "v_proj"].firstIndex(of: rest[1]) {
            return (head + "attn.in_proj_\(rest[2])", third)
        }
        for (openCLIP, transformers) in renames where rest.count == transformers.count + 1 && rest.starts(with: transformers) {
            return (head + (openCLIP + [rest.last!]).joined(separator: "."), nil)
        }
        return nil
    }
}
