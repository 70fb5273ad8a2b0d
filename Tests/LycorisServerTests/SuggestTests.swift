import LycorisAlgorithms
import LycorisCheckpoints
import LycorisRPC
import Testing

/// `network.suggest` answers ``AlgorithmSuggestion``'s plan itself — the same choice per
/// layer, totals and target — for a budget given as a count or as bytes at a dtype.
@Suite("network.suggest")
struct SuggestTests {
    static let layers: [(name: String, wire: JSONValue, shape: [Int])] = [
        ("lora_unet_down_blocks_0_attn1_to_q", ["name": "lora_unet_down_blocks_0_attn1_to_q", "kind": "linear", "in_features": 320, "out_features": 320], [320, 320]),
        ("lora_unet_down_blocks_1_conv", ["name": "lora_unet_down_blocks_1_conv", "kind": "conv2d", "in_channels": 320, "out_channels": 640,
                                          "kernel_size": 3, "padding": 1], [640, 320, 3, 3]),
        ("lora_te_layers_0_fc1", ["name": "lora_te_layers_0_fc1", "kind": "linear", "in_features": 77, "out_features": 768], [768, 77]),
    ]

    @Test("the library's plan, layer by layer, for 200,000 parameters given three ways", arguments: [
        JSONValue.integer(200_000), ["budget": "400KB"], ["budget": "800KB", "dtype": "f32"],
    ])
    func samePlan(_ given: JSONValue) throws {
        let harness = try ServerHarness()
        var params: JSONObject = ["layers": .array(Self.layers.map(\.wire))]
        if let object = given.objectValue { for (key, value) in object.members { params[key] = value } } else { params["budget"] = given }
        let result = try harness.result("network.suggest", .object(params))
        let plan = try AlgorithmSuggestion.plan(Self.layers.map { .init(name: $0.name, shape: $0.shape) }, budget: 200_000)
        #expect(result["budget"]?.intValue == 200_000 && result["parameters"]?.intValue == plan.parameters)
        #expect(result["target"]?.doubleValue == plan.target)
        let entries = try #require(result["layers"]?.arrayValue)
        #expect(entries.count == plan.layers.count)
        for (entry, (layer, choice)) in zip(entries, plan.layers) {
            #expect(entry["name"]?.stringValue == layer.name)
            #expect(entry["algo"]?.stringValue == choice.algorithm.rawValue)
            #expect(entry["rank"]?.intValue == choice.rank && entry["parameters"]?.intValue == choice.parameters)
            #expect(entry["attainable_rank"]?.intValue == choice.attainableRank)
            if choice.algorithm == .lokr {
                #expect(entry["options"]?["factor"]?.intValue == choice.lokrFactor)
                #expect(entry["w1_shape"]?.arrayValue?.compactMap(\.intValue) == [choice.factor!.0, choice.factor!.1])
            } else {
                #expect(entry["options"]?["lora_dim"]?.intValue == choice.rank)
            }
        }
    }
}
