import LycorisCore
import LycorisFormats

/// A named set of adapter modules (one per adapted layer), saved and loaded as one
/// safetensors file with kohya/LyCORIS key names.
public struct Network: Sendable {
    public private(set) var modules: [AdapterModule] = []
    private var indexByName: [String: Int] = [:]

    public init() {}

    public subscript(name: String) -> AdapterModule? {
        get { indexByName[name].map { modules[$0] } }
        set {
            if let index = indexByName[name] {
                if let newValue { modules[index] = newValue } else { remove(name) }
            } else if let newValue {
                indexByName[name] = modules.count
                modules.append(newValue)
            }
        }
    }

    public var names: [String] { modules.map(\.name) }

    /// Adds a module; its name must be new and a valid module name (no dots).
    public mutating func add(_ module: AdapterModule) throws {
        guard !module.name.isEmpty, !module.name.contains(".") else {
            throw AdapterError("module name '\(module.name)' must be non-empty and contain no '.'")
        }
        guard indexByName[module.name] == nil else { throw AdapterError("module \(module.name) already exists") }
        self[module.name] = module
    }

    private mutating func remove(_ name: String) {
        modules.removeAll { $0.name == name }
        indexByName = Dictionary(uniqueKeysWithValues: modules.enumerated().map { ($1.name, $0) })
    }

    /// Sets every module's multiplier.
    public mutating func setMultiplier(_ multiplier: Float) {
        for i in modules.indices { modules[i].multiplier = multiplier }
    }

    /// Switches every module between training and evaluation.
    public mutating func setTraining(_ training: Bool) {
        for i in modules.indices { modules[i].isTraining = training }
    }

    /// Sets every module's T-LoRA timestep mask (nil: all ranks); other algorithms ignore it.
    public mutating func setTimestepMask(_ mask: Tensor?) {
        for i in modules.indices { modules[i].timestepMask = mask }
    }

    public var parameterCount: Int { modules.reduce(0) { $0 + $1.algorithm.parameterCount } }

    /// Writes the network atomically: `<module>.<suffix>` for every saved tensor, float
    /// tensors in `dtype` (F32, F16 or BF16), `alpha` always 0-dim F32, IA3's `on_input` I64.
    public func save(toPath path: String, dtype: DType = .f32, metadata: [String: String] = [:]) throws {
        guard [.f32, .f16, .bf16].contains(dtype) else {
            throw AdapterError("adapters are saved as F32, F16 or BF16, not \(dtype.rawValue)")
        }
        var writer = SafetensorsWriter(metadata: metadata)
        for module in modules {
            for saved in module.algorithm.savedTensors() {
                let key = KeySchema.key(module: module.name, suffix: saved.suffix)
                switch saved.storage {
                case .followsFile: try writer.add(key, saved.tensor, as: dtype)
                case .float32: try writer.add(key, saved.tensor, as: .f32)
                case .int64: try writer.add(key, int64: saved.tensor.scalars.map { Int64($0) }, shape: saved.tensor.shape)
                }
            }
        }
        try writer.write(toPath: path)
    }

    /// Loads every module of `file` onto the layers `layers` names (module name → layer,
    /// with optional base weight and bias). Modules of the file without a layer, and layers
    /// without a module, are returned so the caller can report them.
    public static func load(
        _ file: AdapterFile, layers: [String: (spec: LayerSpec, weight: Tensor?, bias: Tensor?)]
    ) throws -> (network: Network, unmatchedModules: [String]) {
        var network = Network()
        var unmatched: [String] = []
        for module in file.modules {
            guard let layer = layers[module.name] else {
                unmatched.append(module.name)
                continue
            }
            let adapter = try file.adapter(for: module, layer: layer.spec, baseWeight: layer.weight)
            try network.add(AdapterModule(name: module.name, algorithm: adapter, options: AdapterOptions(),
                                          baseWeight: layer.weight, baseBias: layer.bias))
        }
        return (network, unmatched)
    }
}
