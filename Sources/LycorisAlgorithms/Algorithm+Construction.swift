import LycorisCore

/// The one place that maps an ``Algorithm`` to the type computing it.
extension Algorithm {
    private var computingType: (any AdapterAlgorithm.Type)? {
        switch self {
        case .locon: LoCon.self
        case .loha: LoHa.self
        case .lokr: LoKr.self
        case .ia3: IA3.self
        case .dylora: DyLoRA.self
        case .norms: Norm.self
        case .diagOFT: DiagOFT.self
        case .boft: BOFT.self
        case .tlora: TLoRA.self
        default: nil
        }
    }

    /// A freshly initialised adapter of this algorithm on `layer` (T-LoRA needs `baseWeight`).
    public func makeAdapter(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource,
                            baseWeight: Tensor? = nil) throws -> any AdapterAlgorithm {
        if let problem = layer.invalidReason { throw AdapterError("invalid layer: \(problem)") }
        if let problem = options.invalidReason { throw AdapterError("invalid options: \(problem)") }
        try checkAdapts(layer)
        guard let type = computingType else {
            throw AdapterError("algorithm \(rawValue) is recognised but not computed by this version")
        }
        if self == .tlora, let baseWeight { return try TLoRA(layer: layer, options: options, baseWeight: baseWeight, random: &random) }
        return try type.init(layer: layer, options: options, random: &random)
    }

    /// An adapter of this algorithm on `layer` from a file's tensors (by key suffix).
    /// DyLoRA files are LoRA files and load as LoCon.
    public func loadAdapter(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?,
                            baseWeight: Tensor? = nil) throws -> any AdapterAlgorithm {
        try checkAdapts(layer)
        switch self {
        case .locon, .dylora: return try LoCon(layer: layer, tensors: tensors, alpha: alpha)
        case .loha: return try LoHa(layer: layer, tensors: tensors, alpha: alpha)
        case .lokr: return try LoKr(layer: layer, tensors: tensors, alpha: alpha)
        case .ia3: return try IA3(layer: layer, tensors: tensors, alpha: alpha)
        case .norms: return try Norm(layer: layer, tensors: tensors, alpha: alpha)
        case .diagOFT: return try DiagOFT(layer: layer, tensors: tensors, alpha: alpha)
        case .boft: return try BOFT(layer: layer, tensors: tensors, alpha: alpha)
        case .tlora:
            guard let baseWeight else { throw AdapterError("tlora needs the layer's base weight to load (its frozen factors are W0's SVD)") }
            return try TLoRA(layer: layer, tensors: tensors, alpha: alpha, baseWeight: baseWeight)
        default: throw AdapterError("algorithm \(rawValue) is recognised but not computed by this version")
        }
    }

    /// Norm layers are adapted by `norms` only, and `norms` adapts norm layers only.
    private func checkAdapts(_ layer: LayerSpec) throws {
        if let normalization = layer.normalization, self != .norms {
            throw AdapterError("\(rawValue) cannot adapt a \(normalization.kindName) layer (only norm adapts layer_norm and group_norm layers)")
        }
        if layer.normalization == nil, self == .norms {
            throw AdapterError("norm adapts only layer_norm and group_norm layers")
        }
    }
}
