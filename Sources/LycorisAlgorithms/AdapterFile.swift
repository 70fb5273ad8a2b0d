import LycorisCore
import LycorisFormats

/// An adapter file's modules, grouped from its keys: what `lycoris info` shows and what
/// loading and merging start from. Works for every LyCORIS algorithm, computed or not.
public struct AdapterFile {
    /// One module's tensors in the file.
    public struct Module: Sendable {
        public let name: String
        /// Detected from the key suffixes (nil when no algorithm matches).
        public let algorithm: Algorithm?
        /// Tensor descriptions by key suffix.
        public let tensors: [String: TensorInfo]
        /// The `alpha` scalar, if the module has one.
        public let alpha: Float?

        /// Suffixes in file order.
        public var suffixes: [String] { tensors.values.sorted { $0.byteRange.lowerBound < $1.byteRange.lowerBound }.map { String($0.name.drop { $0 != "." }.dropFirst()) } }

        /// Element count of every tensor but `alpha`, `on_input` and `scalar`.
        public var parameterCount: Int {
            tensors.filter { !["alpha", "on_input", "scalar"].contains($0.key) }.values.reduce(0) { $0 + $1.shape.product }
        }

        /// The rank as the file encodes it (nil for algorithms without one, or LoKr with
        /// both halves full).
        public var rank: Int? {
            func first(_ suffix: String, axis: Int = 0) -> Int? {
                guard let shape = tensors[suffix]?.shape, shape.count > axis else { return nil }
                return shape[axis]
            }
            switch algorithm {
            case .locon, .dylora: return first("lora_down.weight")
            case .loha: return first("hada_w1_b")
            case .lokr: return first("lokr_w1_b") ?? first("lokr_w2_b")
            case .glora: return first("a1.weight", axis: 1)
            case .tlora: return first("q_layer.weight")
            default: return nil
            }
        }

        /// DoRA's axis, from the shape of `dora_scale`: "output" ((out, 1, …): LyCORIS's
        /// default, what ComfyUI reads) or "input" ((1, in, …): what A1111 reads); nil without DoRA.
        public var doraAxis: String? {
            guard let shape = tensors["dora_scale"]?.shape else { return nil }
            return shape.first == 1 && shape.dropFirst().contains { $0 != 1 } ? "input" : "output"
        }

        /// The storage dtypes of the module's tensors (without `alpha` and `on_input`).
        public var dtypes: [DType] {
            Array(Set(tensors.filter { $0.key != "alpha" && $0.key != "on_input" }.values.map(\.dtype))).sorted { $0.rawValue < $1.rawValue }
        }
    }

    public let path: String
    public let metadata: [String: String]
    /// Modules sorted by name.
    public let modules: [Module]
    /// Keys that do not have the `<module>.<suffix>` form.
    public let strayKeys: [String]
    let file: SafetensorsFile

    public init(path: String) throws {
        file = try SafetensorsFile(path: path)
        self.path = path
        metadata = file.metadata
        var grouped: [String: [String: TensorInfo]] = [:]
        var stray: [String] = []
        for info in file.tensors {
            guard let (module, suffix) = KeySchema.split(key: info.name) else {
                stray.append(info.name)
                continue
            }
            grouped[module, default: [:]][suffix] = info
        }
        var modules: [Module] = []
        for (name, tensors) in grouped.sorted(by: { $0.key < $1.key }) {
            let algorithm = Algorithm.detect(suffixes: Set(tensors.keys), oftBlocksRank: tensors["oft_blocks"]?.shape.count)
            var alpha: Float?
            if tensors["alpha"] != nil { alpha = try file.tensor(KeySchema.key(module: name, suffix: "alpha")).scalars.first }
            modules.append(Module(name: name, algorithm: algorithm, tensors: tensors, alpha: alpha))
        }
        self.modules = modules
        strayKeys = stray
    }

    /// The module's tensors converted to Float32, by suffix (only `suffixes` when given).
    public func tensors(of module: Module, suffixes: [String]? = nil) throws -> [String: Tensor] {
        var result: [String: Tensor] = [:]
        for suffix in suffixes?.filter({ module.tensors[$0] != nil }) ?? Array(module.tensors.keys) {
            result[suffix] = try file.tensor(KeySchema.key(module: module.name, suffix: suffix))
        }
        return result
    }

    /// The module as a computable adapter on `layer` (T-LoRA needs the layer's `baseWeight`).
    public func adapter(for module: Module, layer: LayerSpec, baseWeight: Tensor? = nil) throws -> any AdapterAlgorithm {
        guard let algorithm = module.algorithm else {
            throw AdapterError("\(module.name): no known algorithm has the keys \(module.tensors.keys.sorted())")
        }
        return try algorithm.loadAdapter(layer: layer, tensors: tensors(of: module), alpha: module.alpha, baseWeight: baseWeight)
    }
}
