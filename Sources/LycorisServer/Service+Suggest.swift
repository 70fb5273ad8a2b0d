import LycorisAlgorithms
import LycorisCheckpoints
import LycorisCore
import LycorisRPC

extension LycorisService {
    /// `network.suggest`: `lycoris suggest`'s plan (``AlgorithmSuggestion``) for the linear
    /// and conv layers a client describes as for `network.create` — per layer the algorithm
    /// and the options that build it, so that a client's `algo=auto` sends them back as
    /// `layers[].algo`/`layers[].options`. Needs no network and changes no state.
    ///
    /// `budget`: a parameter count (integer ≥ 1) or a size string (`10MB`, `500KB`, `1GB`,
    /// decimal units) counted at `dtype` (`f16` default, `bf16`, `f32`).
    func networkSuggest(_ p: Params) throws -> JSONValue {
        let dtypeName = try p.string("dtype", default: "f16")
        guard let dtype = DType(rawValue: dtypeName.uppercased()), [.f16, .bf16, .f32].contains(dtype) else {
            throw RPCError.invalidParams("dtype must be f16, bf16 or f32, got \"\(dtypeName)\"", path: "dtype")
        }
        let budgetValue = try p.value("budget")
        let budget: Int
        if let count = budgetValue.intValue, count >= 1 {
            budget = count
        } else if let text = budgetValue.stringValue, let count = AlgorithmSuggestion.parameters(budget: text, dtype: dtype), count >= 1 {
            budget = count
        } else {
            let given = budgetValue.stringValue.map { "\"\($0)\"" } ?? budgetValue.doubleValue.map { "\($0)" } ?? budgetValue.typeName
            throw RPCError.invalidParams("budget must be a parameter count ≥ 1 or a size such as \"10MB\", got \(given)", path: "budget")
        }
        var layers: [AlgorithmSuggestion.Layer] = []
        var names: Set<String> = []
        for layer in try p.objects("layers") {
            let name = try layer.string("name")
            guard names.insert(name).inserted else { throw RPCError.invalidParams("\(layer.at("name")): \"\(name)\" is named twice", path: layer.at("name")) }
            let spec = try Self.layerSpec(layer)
            guard spec.normalization == nil else {
                throw RPCError.invalidParams("\(layer.at("kind")): the plan covers linear and conv layers, not \(spec.kind)", path: layer.at("kind"))
            }
            layers.append(.init(name: name, shape: spec.weightShape))
        }
        let plan: AlgorithmSuggestion.Plan
        do {
            plan = try AlgorithmSuggestion.plan(layers, budget: budget)
        } catch let error as CheckpointError {
            throw RPCError.invalidParams("budget: \(error.description)", path: "budget")
        }
        let planned: [JSONValue] = plan.layers.map { layer, choice in
            [
                "name": .string(layer.name), "algo": .string(choice.algorithm.rawValue), "options": Self.options(of: choice),
                "rank": JSONValue(choice.rank), "w1_shape": choice.factor.map { JSONValue([$0.0, $0.1]) } ?? .null,
                "attainable_rank": JSONValue(choice.attainableRank),
                "full_rank": JSONValue(min(layer.shape[0], layer.shape.dropFirst().reduce(1, *))),
                "parameters": JSONValue(choice.parameters),
            ]
        }
        let blocks: [JSONValue] = AlgorithmSuggestion.blocks(plan).map { block in
            [
                "name": .string(block.name), "layers": JSONValue(block.choices.count),
                "algorithms": .object(block.algorithms.sorted { $0.key < $1.key }.reduce(into: JSONObject()) { $0[$1.key] = JSONValue($1.value) }),
                "min_rank": JSONValue(block.ranks.lowerBound), "max_rank": JSONValue(block.ranks.upperBound),
                "parameters": JSONValue(block.parameters),
            ]
        }
        return [
            "layers": .array(planned), "blocks": .array(blocks), "parameters": JSONValue(plan.parameters),
            "bytes": JSONValue(plan.parameters * dtype.byteSize), "budget": JSONValue(plan.budget), "target": .double(plan.target),
        ]
    }

    /// The `network.create` layer options that build `choice`: the rank as `lora_dim` and
    /// `conv_dim` (which replaces it on k×k convs) without Tucker factors, or for LoKr both
    /// Kronecker halves full under its `factor`.
    static func options(of choice: AlgorithmSuggestion.Choice) -> JSONValue {
        switch choice.algorithm {
        case .lokr:
            ["factor": JSONValue(choice.lokrFactor ?? -1), "full_matrix": true, "decompose_both": false, "use_tucker": false,
             "unbalanced_factorization": false, "lora_dim": 1, "conv_dim": 1]
        default:
            ["lora_dim": JSONValue(choice.rank), "conv_dim": JSONValue(choice.rank), "use_tucker": false]
        }
    }
}
