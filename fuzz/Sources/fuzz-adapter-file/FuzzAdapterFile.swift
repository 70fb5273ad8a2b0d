import Foundation
import FuzzSupport
import LycorisAlgorithms
import LycorisRPC
import LycorisServer

/// Adapter-file loading on arbitrary bytes: what `lycoris info` reads (``AdapterFile``: modules,
/// algorithms, ranks, dtypes, every tensor), then `network.load` of the file into a network whose
/// layers have the names and shapes of the fixture networks (Tests/LycorisAlgorithmsTests/
/// Fixtures/networks), then `delta_weight` of every module, so a file that loads is also computed.
/// Loading must answer or throw an `RPCError`; computing a loaded network must succeed or
/// report an `RPCError` (e.g. non-finite values).
nonisolated(unsafe) private let scratch = ScratchFile()
nonisolated(unsafe) private let service = LycorisService()
nonisolated(unsafe) private var initialized = false

/// The fixture networks' layers: name, kind and sizes, and the base weight's element count.
private let layers: [(layer: JSONValue, weightElements: Int)] = [
    (["name": "lycoris_down_blocks_0_attentions_0_proj_in", "kind": "linear", "in_features": 16, "out_features": 24], 384),
    (["name": "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "kind": "linear",
      "in_features": 24, "out_features": 24], 576),
    (["name": "lycoris_down_blocks_0_resnets_0_conv1", "kind": "conv2d", "in_channels": 8, "out_channels": 12,
      "kernel_size": 3, "padding": 1], 864),
    (["name": "lycoris_down_blocks_0_resnets_0_time_emb_proj", "kind": "linear", "in_features": 16, "out_features": 12], 192),
    (["name": "lycoris_mid_block_conv", "kind": "conv2d", "in_channels": 12, "out_channels": 12], 144),
    (["name": "lycoris_mid_block_norm", "kind": "layer_norm", "normalized_shape": 12, "algo": "norm"], 12),
]

/// network.create's params: every layer with a zero base weight (IA3 needs one).
private let createParams: JSONValue = {
    let described: [JSONValue] = layers.map { entry in
        guard case var .object(object) = entry.layer, case let .string(name)? = object["name"] else { fatalError() }
        let shape: JSONValue = switch name {
        case "lycoris_down_blocks_0_resnets_0_conv1": [12, 8, 3, 3]
        case "lycoris_mid_block_conv": [12, 12, 1, 1]
        case "lycoris_mid_block_norm": [12]
        default: .array([.integer(Int64(entry.weightElements / (object["in_features"]?.intValue ?? 1))),
                         object["in_features"] ?? .null])
        }
        object["weight"] = ["dtype": "F32", "shape": shape,
                            "data": .string(Data(count: 4 * entry.weightElements).base64EncodedString())]
        return .object(object)
    }
    return ["algo": "lora", "options": ["lora_dim": 4, "alpha": 1], "seed": 0, "layers": .array(described)]
}()

private func call(_ method: String, _ params: JSONValue?) -> Bool {
    do {
        _ = try service.handle(method: method, params: params)
        return true
    } catch is RPCError {
        return false
    } catch {
        preconditionFailure("\(method) threw something other than an RPCError: \(error)")
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAdapterFile(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    scratch.store(UnsafeRawBufferPointer(start: data, count: size))
    guard let file = try? AdapterFile(path: scratch.path) else { return 0 }
    for module in file.modules {
        _ = (module.rank, module.parameterCount, module.dtypes, module.suffixes, module.algorithm)
        _ = try? file.tensors(of: module)
    }
    if !initialized {
        precondition(call("initialize", .object(JSONObject())), "initialize failed")
        initialized = true
    }
    precondition(call("network.create", createParams), "network.create of the fixture layers failed")
    if call("network.load", ["path": .string(scratch.path)]) {
        _ = call("delta_weight", .object(JSONObject()))
    }
    // Nothing outlives the input, so LeakSanitizer's per-input check sees every allocation.
    service.releaseAll()
    return 0
}
