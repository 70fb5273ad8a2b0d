import Foundation
import LycorisAlgorithms
@testable import LycorisCheckpoints
import LycorisCore
import LycorisFormats
import Testing

/// `CheckpointMerge` streams its output; these tests hold it to the file the in-memory writer
/// assembled before (every tensor added whole, merged ones as W0 + Σ (merged_i − W0)), and to
/// leaving nothing behind when a job fails half-way.
@Suite("checkpoint merge")
struct CheckpointMergeTests {
    static let te = "cond_stage_model.model.transformer.resblocks.0."
    static let unet = "model.diffusion_model.input_blocks.1.1."

    /// An SD2-shaped single file (OpenCLIP fused in_proj with its bias, a norm whose bias comes
    /// before its weight, a conv, an F16 tensor, an integer one) with random values.
    static func checkpoint(at path: String) throws {
        var random = RandomSource(seed: 7)
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        try writer.add(te + "attn.in_proj_bias", .normal([12], std: 1, using: &random))
        try writer.add(te + "attn.in_proj_weight", .normal([12, 4], std: 1, using: &random))
        try writer.add(te + "attn.out_proj.weight", .normal([4, 4], std: 1, using: &random), as: .f16)
        try writer.add(unet + "proj_in.weight", .normal([6, 6], std: 1, using: &random))
        try writer.add(unet + "transformer_blocks.0.norm1.bias", .normal([6], std: 1, using: &random))
        try writer.add(unet + "transformer_blocks.0.norm1.weight", .normal([6], std: 1, using: &random))
        try writer.add("model.diffusion_model.input_blocks.0.0.weight", .normal([6, 4, 3, 3], std: 1, using: &random), as: .bf16)
        try writer.add("cond_stage_model.model.positional_embedding", .normal([7, 4], std: 1, using: &random))
        try writer.add("step", int64: [3], shape: [])
        try writer.write(toPath: path)
    }

    /// LoRA on q and v of the fused in_proj and on the conv, a norm module (weight and bias);
    /// `broken` adds a LoRA whose shapes fit no layer.
    static func adapter(at path: String, broken: Bool = false) throws {
        var random = RandomSource(seed: 8)
        var writer = SafetensorsWriter()
        func lora(_ name: String, out: Int, in inShape: [Int], rank: Int) throws {
            try writer.add(name + ".alpha", Tensor(shape: [], scalars: [Float(rank) / 2]))
            try writer.add(name + ".lora_down.weight", .normal([rank] + inShape, std: 0.3, using: &random))
            try writer.add(name + ".lora_up.weight", .normal([out, rank] + Array(repeating: 1, count: inShape.count - 1), std: 0.3, using: &random))
        }
        try lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", out: 4, in: [4], rank: 2)
        try lora("lora_te_text_model_encoder_layers_0_self_attn_v_proj", out: 4, in: [4], rank: 2)
        try lora("lora_unet_conv_in", out: 6, in: [4, 3, 3], rank: 2)
        try lora("lora_unet_down_blocks_0_attentions_0_proj_in", out: broken ? 5 : 6, in: [6], rank: 3)
        try writer.add("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1.w_norm", .normal([6], std: 0.3, using: &random))
        try writer.add("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1.b_norm", .normal([6], std: 0.3, using: &random))
        try writer.write(toPath: path)
    }

    /// The file as the in-memory writer built it: each merged tensor computed whole and added,
    /// every other one added as raw bytes or re-typed.
    static func inMemory(base path: String, adapter: String, multiplier: Float, dtype: DType?) throws -> [UInt8] {
        let checkpoint = try Checkpoint(path: path)
        let table = try CheckpointLayers(checkpoint)
        let file = try AdapterFile(path: adapter)
        let base = checkpoint.parts[0].file
        var merged: [String: Tensor] = [:]
        for module in file.modules {
            let layer = try #require(table.layer(named: module.name), "\(module.name)")
            let original = try base.tensor(layer.weightKey)
            let originalBias = try layer.biasKey.map { try base.tensor($0) }
            let baseWeight = layer.rows.map { original.rows($0) } ?? original
            let baseBias = layer.rows.flatMap { r in originalBias.map { $0.rows(r) } } ?? originalBias
            let (weight, bias) = try AdapterMerge.mergedLayer(module, of: file, baseWeight: baseWeight, weightKey: layer.weightKey,
                                                              baseBias: baseBias, multiplier: multiplier)
            merged[layer.weightKey, default: original].addRows(layer.rows, weight - baseWeight)
            if let bias, let baseBias, let key = layer.biasKey {
                merged[key, default: originalBias!].addRows(layer.rows, bias - baseBias)
            }
        }
        var writer = SafetensorsWriter(metadata: base.metadata)
        for info in base.tensors {
            let target = info.dtype.isFloatingPoint ? dtype ?? info.dtype : info.dtype
            if let tensor = merged[info.name] {
                try writer.add(info.name, tensor, as: target)
            } else if target != info.dtype {
                try writer.add(info.name, try base.tensor(info.name), as: target)
            } else {
                try writer.addRaw(info.name, dtype: info.dtype, shape: info.shape, bytes: base.rawBytes(info.name))
            }
        }
        return try writer.serialized()
    }

    @Test("the streamed file is byte-identical to the in-memory writer's", arguments: [nil, DType.f16])
    func byteIdentical(_ dtype: DType?) throws {
        let directory = try CheckpointLayersTests.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (base, adapter, output) = (directory + "/sd2.safetensors", directory + "/a.safetensors", directory + "/out.safetensors")
        try Self.checkpoint(at: base)
        try Self.adapter(at: adapter)
        var steps: [Int] = []
        let report = try CheckpointMerge.merge(checkpoint: base, adapters: [.init(path: adapter, multiplier: 0.7)], output: output,
                                               dtype: dtype) { done, _ in steps.append(done) }
        #expect(report.written && report.failed.isEmpty && report.unmatched.isEmpty)
        #expect(report.merged.count == 5 && report.mergedBiases == [Self.unet + "transformer_blocks.0.norm1.bias"])
        #expect(steps == Array(1...9), "one step per tensor written")
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: output)))
        #expect(written == (try Self.inMemory(base: base, adapter: adapter, multiplier: 0.7, dtype: dtype)))
        // And the merge changed what it should (k's third only rounded when re-typed).
        let before = try SafetensorsFile(path: base), after = try SafetensorsFile(path: output)
        #expect(try before.tensor(Self.te + "attn.in_proj_weight").scalars != after.tensor(Self.te + "attn.in_proj_weight").scalars)
        if dtype == nil {
            #expect(try before.tensor(Self.te + "attn.in_proj_weight").rows(4..<8).scalars
                    == after.tensor(Self.te + "attn.in_proj_weight").rows(4..<8).scalars, "k's third is untouched")
        }
    }

    @Test("a module failing half-way with --strict leaves no output and no temporary file (file and folder)")
    func strictFailureLeavesNothing() throws {
        let directory = try CheckpointLayersTests.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (base, adapter) = (directory + "/sd2.safetensors", directory + "/broken.safetensors")
        try Self.checkpoint(at: base)
        try Self.adapter(at: adapter, broken: true)
        let report = try CheckpointMerge.merge(checkpoint: base, adapters: [.init(path: adapter, multiplier: 1)],
                                               output: directory + "/out.safetensors", strict: true)
        #expect(!report.written && report.failed.map(\.module) == ["lora_unet_down_blocks_0_attentions_0_proj_in"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["broken.safetensors", "sd2.safetensors"])
        // Without --strict the failed module is listed and the rest is written.
        let lenient = try CheckpointMerge.merge(checkpoint: base, adapters: [.init(path: adapter, multiplier: 1)],
                                                output: directory + "/out.safetensors")
        #expect(lenient.written && lenient.failed.count == 1 && lenient.merged.count == 4)

        // A diffusers folder whose second part fails: the temporary folder goes too.
        let folder = directory + "/pipe"
        try FileManager.default.createDirectory(atPath: folder + "/unet", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: folder + "/text_encoder", withIntermediateDirectories: true)
        var random = RandomSource(seed: 9)
        try writeSafetensors([("down_blocks.0.attentions.0.proj_in.weight", .normal([6, 6], std: 1, using: &random))],
                             to: URL(fileURLWithPath: folder + "/unet/diffusion_pytorch_model.safetensors"))
        try writeSafetensors([("text_model.encoder.layers.0.self_attn.q_proj.weight", .normal([4, 4], std: 1, using: &random))],
                             to: URL(fileURLWithPath: folder + "/text_encoder/model.safetensors"))
        let failed = try CheckpointMerge.merge(checkpoint: folder, adapters: [.init(path: adapter, multiplier: 1)],
                                               output: directory + "/merged", strict: true)
        #expect(!failed.written && failed.files.isEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
                == ["broken.safetensors", "out.safetensors", "pipe", "sd2.safetensors"])
    }
}
