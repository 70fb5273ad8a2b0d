import LycorisCheckpoints
import Testing

/// The UNet key conversion on the names kohya.md and loaders.md quote from kohya and A1111.
@Suite("UNet naming")
struct UNetNamingTests {
    /// SD1.x: the last down level and the first up level have no attention blocks.
    let sd1 = UNetNaming(upLevelsWithAttention: [1, 2, 3])
    /// SDXL: the first down level and the last up level have none.
    let sdxl = UNetNaming(upLevelsWithAttention: [0, 1])

    @Test("LDM ⇄ diffusers pairs as A1111 converts them", arguments: [
        ("input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"),
        ("input_blocks.2.0.in_layers.2.weight", "down_blocks.0.resnets.1.conv1.weight"),
        ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"),
        ("input_blocks.11.0.emb_layers.1.weight", "down_blocks.3.resnets.1.time_emb_proj.weight"),
        ("middle_block.0.out_layers.3.weight", "mid_block.resnets.0.conv2.weight"),
        ("middle_block.1.transformer_blocks.0.attn2.to_k.weight", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        ("middle_block.2.in_layers.0.bias", "mid_block.resnets.1.norm1.bias"),
        ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
        ("output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"),
        ("output_blocks.9.0.out_layers.0.weight", "up_blocks.3.resnets.0.norm2.weight"),
        ("time_embed.0.weight", "time_embedding.linear_1.weight"),
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("out.2.bias", "conv_out.bias"),
    ])
    func sd1Pairs(_ ldm: String, _ diffusers: String) {
        #expect(sd1.diffusersKey(ldm: ldm) == diffusers)
        #expect(sd1.ldmKey(diffusers: diffusers) == ldm)
    }

    @Test("SDXL: label_emb, and the upsampler behind the attentions of level 0")
    func sdxlPairs() {
        #expect(sdxl.diffusersKey(ldm: "label_emb.0.2.weight") == "add_embedding.linear_2.weight")
        #expect(sdxl.ldmKey(diffusers: "add_embedding.linear_1.bias") == "label_emb.0.0.bias")
        #expect(sdxl.ldmKey(diffusers: "up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.2.conv.weight")
        #expect(sdxl.ldmKey(diffusers: "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight")
                == "output_blocks.3.1.transformer_blocks.1.attn1.to_q.weight")
        #expect(sdxl.ldmKey(diffusers: "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight")
                == "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    }

    @Test("the up levels with attentions are read from either layout")
    func attentionLevels() {
        #expect(UNetNaming(keys: ["up_blocks.1.attentions.0.proj_in.weight", "up_blocks.0.resnets.0.conv1.weight"]).upLevelsWithAttention == [1])
        #expect(UNetNaming(keys: ["output_blocks.3.1.proj_in.weight", "output_blocks.2.1.conv.weight"]).upLevelsWithAttention == [1])
    }

    @Test("keys outside an SD UNet have no counterpart", arguments: [
        "input_blocks.3.1.proj_in.weight", "middle_block.3.in_layers.0.weight", "output_blocks.1.1.conv.weight",
        "something.else.weight", "input_blocks.1.0.in_layers.1.weight",
    ])
    func foreignKeys(_ key: String) {
        #expect(sd1.diffusersKey(ldm: key) == nil)
    }
}
