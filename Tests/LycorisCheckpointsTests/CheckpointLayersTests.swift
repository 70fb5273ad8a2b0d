import Foundation
import LycorisCheckpoints
import LycorisCore
import LycorisFormats
import Testing

/// Checkpoints synthesised as key sets: family detection, the plain-state-dict naming, the
/// single-file OpenCLIP split with its biases, and folders whose shards are listed by an index.
@Suite("checkpoint layers")
struct CheckpointLayersTests {
    static func write(_ keys: [(String, [Int])], to path: String) throws {
        var writer = SafetensorsWriter()
        for (key, shape) in keys { try writer.add(key, Tensor.zeros(shape)) }
        try writer.write(toPath: path)
    }

    static func scratch() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ckpt-\(UUID())").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test("families from keys and shapes")
    func families() {
        #expect(ModelFamily.detect(["model.diffusion_model.input_blocks.1.1.proj_in.weight": [8, 8, 1, 1]]) == .sd1)
        #expect(ModelFamily.detect(["model.diffusion_model.input_blocks.1.1.proj_in.weight": [8, 8]]) == .sd2)
        #expect(ModelFamily.detect(["cond_stage_model.model.ln_final.weight": [8]]) == .sd2)
        #expect(ModelFamily.detect(["model.diffusion_model.label_emb.0.0.weight": [8, 4]]) == .sdxl)
        #expect(ModelFamily.detect(["down_blocks.0.attentions.0.proj_in.weight": [8, 8, 1, 1]]) == nil, "bare keys in one file: a state dict")
        #expect(ModelFamily.detect(["down_blocks.0.attentions.0.proj_in.weight": [8, 8]], prefixed: false) == .sd2)
    }

    @Test("a plain state dict: every a.b.c.weight behind any prefix")
    func plain() throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/plain.safetensors"
        try Self.write([("blocks.0.to_q.weight", [4, 4]), ("blocks.0.to_q.bias", [4]), ("scale", [1])], to: path)
        let table = try CheckpointLayers(try Checkpoint(path: path))
        #expect(table.family == nil && table.layers.count == 1)
        for name in ["lora_unet_blocks_0_to_q", "lycoris_blocks_0_to_q", "lora_te1_blocks_0_to_q"] {
            #expect(table.layer(named: name)?.biasKey == "blocks.0.to_q.bias", "\(name)")
        }
        #expect(table.layer(named: "blocks_0_to_q") == nil, "a prefix is required")
    }

    @Test("SD2 single file: q/k/v are row thirds of in_proj with the bias thirds; other keys map one to one")
    func openCLIP() throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/sd2.safetensors"
        let prefix = "cond_stage_model.model.transformer.resblocks.0."
        try Self.write([(prefix + "attn.in_proj_weight", [12, 4]), (prefix + "attn.in_proj_bias", [12]),
                        (prefix + "attn.out_proj.weight", [4, 4]), ("cond_stage_model.model.positional_embedding", [7, 4]),
                        ("first_stage_model.decoder.conv_in.weight", [4, 4, 3, 3])], to: path)
        let table = try CheckpointLayers(try Checkpoint(path: path))
        #expect(table.family == .sd2)
        #expect(table.layers.map(\.name) == ["q", "k", "v", "out"].map { "lora_te_text_model_encoder_layers_0_self_attn_\($0)_proj" })
        let v = try #require(table.layer(named: "lora_te_text_model_encoder_layers_0_self_attn_v_proj"))
        #expect(v.rows == 8..<12 && v.biasKey == prefix + "attn.in_proj_bias" && v.weightKey == prefix + "attn.in_proj_weight")
        #expect(v.otherLayoutKey == "text_model.encoder.layers.0.self_attn.v_proj.weight")
    }

    @Test("a sharded diffusers folder is read through its index; a missing shard is named")
    func shards() throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let unet = directory + "/unet"
        try FileManager.default.createDirectory(atPath: unet, withIntermediateDirectories: true)
        try Self.write([("down_blocks.0.attentions.0.proj_in.weight", [8, 8, 1, 1])], to: unet + "/a.safetensors")
        try Self.write([("down_blocks.0.attentions.0.proj_in.bias", [8])], to: unet + "/b.safetensors")
        let index = #"{"weight_map": {"down_blocks.0.attentions.0.proj_in.weight": "a.safetensors", "down_blocks.0.attentions.0.proj_in.bias": "b.safetensors"}}"#
        try index.write(toFile: unet + "/diffusion_pytorch_model.safetensors.index.json", atomically: true, encoding: .utf8)
        let checkpoint = try Checkpoint(path: directory)
        let table = try CheckpointLayers(checkpoint)
        let layer = try #require(table.layer(named: "lora_unet_down_blocks_0_attentions_0_proj_in"))
        #expect(checkpoint.parts[layer.part].relativePath == "unet/a.safetensors")
        #expect(layer.biasPart.map { checkpoint.parts[$0].relativePath } == "unet/b.safetensors")
        #expect(table.layer(named: "lora_unet_input_blocks_1_1_proj_in")?.name == layer.name, "the LDM spelling is an alias")
        try FileManager.default.removeItem(atPath: unet + "/b.safetensors")
        #expect(throws: CheckpointError.self) { try Checkpoint(path: directory) }
    }
}
