import LycorisCheckpoints
import Testing

@Suite("text encoder naming")
struct TextEncoderNamingTests {
    @Test("a fused in_proj is q, k and v, a third of the rows each, and back")
    func inProj() {
        let slices = TextEncoderNaming.transformersSlices(openCLIP: "transformer.resblocks.22.attn.in_proj_weight", rows: 3072)
        #expect(slices.map(\.key) == ["q", "k", "v"].map { "text_model.encoder.layers.22.self_attn.\($0)_proj.weight" })
        #expect(slices.map(\.rows) == [0..<1024, 1024..<2048, 2048..<3072])
        for (third, slice) in slices.enumerated() {
            let back = TextEncoderNaming.openCLIPKey(transformers: slice.key)
            #expect(back?.key == "transformer.resblocks.22.attn.in_proj_weight" && back?.third == third)
        }
        let bias = TextEncoderNaming.transformersSlices(openCLIP: "transformer.resblocks.0.attn.in_proj_bias", rows: 6)
        #expect(bias.map(\.key).last == "text_model.encoder.layers.0.self_attn.v_proj.bias" && bias.last?.rows == 4..<6)
    }

    @Test("renamed layers both ways", arguments: [
        ("transformer.resblocks.3.mlp.c_fc.weight", "text_model.encoder.layers.3.mlp.fc1.weight"),
        ("transformer.resblocks.3.mlp.c_proj.bias", "text_model.encoder.layers.3.mlp.fc2.bias"),
        ("transformer.resblocks.10.attn.out_proj.weight", "text_model.encoder.layers.10.self_attn.out_proj.weight"),
        ("transformer.resblocks.0.ln_1.weight", "text_model.encoder.layers.0.layer_norm1.weight"),
        ("transformer.resblocks.0.ln_2.bias", "text_model.encoder.layers.0.layer_norm2.bias"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ])
    func renames(_ openCLIP: String, _ transformers: String) {
        #expect(TextEncoderNaming.transformersSlices(openCLIP: openCLIP, rows: 8) == [.init(key: transformers, rows: nil)])
        #expect(TextEncoderNaming.openCLIPKey(transformers: transformers)?.key == openCLIP)
    }

    @Test("embeddings and text_projection are not adaptable layers")
    func notAdaptable() {
        for key in ["token_embedding.weight", "positional_embedding", "text_projection", "transformer.resblocks.0.attn.in_proj_weight"] {
            #expect(TextEncoderNaming.transformersSlices(openCLIP: key, rows: 8).isEmpty, "\(key)")
        }
        #expect(TextEncoderNaming.openCLIPKey(transformers: "text_model.embeddings.token_embedding.weight") == nil)
    }
}
