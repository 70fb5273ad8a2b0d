import LycorisAlgorithms
import LycorisCore
import LycorisRPC

/// The norm layer kinds on the wire (network.create's `layers[]`, network.info's `layer`):
///
///     {"kind": "layer_norm", "normalized_shape": int or [int], "eps"?: 1e-5, "has_bias"?: true}
///     {"kind": "group_norm", "num_groups": G, "num_channels": C, "eps"?: 1e-5, "has_bias"?: true}
extension LycorisService {
    /// The members of a norm layer besides its kind's own.
    static let normLayerMembers: Set<String> = ["name", "kind", "algo", "options", "weight", "bias", "eps", "has_bias"]

    /// A `layer_norm` or `group_norm` layer description; a member it does not have is -32602.
    static func normalization(_ p: Params, kind: String) throws -> Normalization {
        let own: Set<String> = kind == "layer_norm" ? ["normalized_shape"] : ["num_groups", "num_channels"]
        let allowed = normLayerMembers.union(own)
        for key in p.object.keys where !allowed.contains(key) && p.has(key) {
            throw RPCError.invalidParams("\(p.at(key)) is not a member of a \(kind) layer (members: \(allowed.sorted().joined(separator: ", ")))", path: p.at(key))
        }
        let normKind: Normalization.Kind
        if kind == "layer_norm" {
            let value = try p.value("normalized_shape")
            if let single = value.intValue {
                normKind = .layer(normalizedShape: [single])
            } else if case .array = value {
                normKind = .layer(normalizedShape: try p.ints("normalized_shape"))
            } else {
                throw RPCError.invalidParams("\(p.at("normalized_shape")) must be an integer or an array of integers", path: p.at("normalized_shape"))
            }
        } else {
            normKind = .group(groups: try p.int("num_groups"), channels: try p.int("num_channels"))
        }
        var eps = 1e-5
        if p.has("eps") {
            guard let value = try p.value("eps").doubleValue else {
                throw RPCError.invalidParams("\(p.at("eps")) must be a number", path: p.at("eps"))
            }
            eps = value
        }
        return Normalization(kind: normKind, eps: eps, hasBias: try p.bool("has_bias", default: true))
    }

    /// network.info's description of a norm layer, every member filled in.
    static func normalizationJSON(_ normalization: Normalization) -> JSONValue {
        var object: JSONObject = ["kind": .string(normalization.kindName)]
        switch normalization.kind {
        case let .layer(normalizedShape):
            object["normalized_shape"] = JSONValue(normalizedShape)
        case let .group(groups, channels):
            object["num_groups"] = JSONValue(groups)
            object["num_channels"] = JSONValue(channels)
        }
        object["eps"] = .double(normalization.eps)
        object["has_bias"] = .bool(normalization.hasBias)
        return .object(object)
    }
}
