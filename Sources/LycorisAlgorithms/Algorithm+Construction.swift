import LycorisCore

/// The one place that maps an ``Algorithm`` to the type computing it.
extension Algorithm {
    private var computingType: any AdapterAlgorithm.Type {
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
        case .glora: GLoRA.self
        case .full: Full.self
        }
    }

    /// A freshly initialised adapter of this algorithm on `layer`. `baseWeight` is the layer's
    /// W0 (DoRA's magnitude starts at its norms, T-LoRA's factors at its SVD); `hasBias`
    /// whether the layer has a bias (Full then trains `diff_b`).
    public func makeAdapter(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource,
                            baseWeight: Tensor? = nil, hasBias: Bool = false) throws -> any AdapterAlgorithm {
        if let problem = layer.invalidReason { throw AdapterError("invalid layer: \(problem)") }
        if let problem = options.invalidReason { throw AdapterError("invalid options: \(problem)") }
        try checkAdapts(layer)
        if self == .full { return try Full(layer: layer, options: options, hasBias: hasBias) }
        if self == .tlora, let baseWeight { return try TLoRA(layer: layer, options: options, baseWeight: baseWeight, random: &random) }
        let adapter = try computingType.init(layer: layer, options: options, random: &random)
        guard options.weightDecompose && decomposesWeight else { return adapter }
        guard let baseWeight else { throw AdapterError("\(rawValue) with weight_decompose (DoRA) needs the base layer's weight") }
        return try Self.decompose(adapter, baseWeight: baseWeight, onOutput: options.wdOnOutput)
    }

    /// The algorithms DoRA decomposes; LyCORIS's other modules ignore `weight_decompose`, and
    /// so does this.
    public var decomposesWeight: Bool { [.locon, .loha, .lokr].contains(self) }

    /// Whether an adapter of this algorithm with `options` reads the base weight W0 (IA3
    /// scales it, GLoRA multiplies it, Diag-OFT/BOFT rotate it, T-LoRA starts from its SVD,
    /// DoRA normalises W0 + ΔW).
    public func needsBaseWeight(_ options: AdapterOptions) -> Bool {
        [.ia3, .glora, .diagOFT, .boft, .tlora].contains(self) || (options.weightDecompose && decomposesWeight)
    }

    /// DoRA around LoCon, LoHa or LoKr.
    private static func decompose(_ adapter: some AdapterAlgorithm, baseWeight: Tensor, onOutput: Bool) throws -> any AdapterAlgorithm {
        try DoRA(base: adapter, baseWeight: baseWeight, onOutput: onOutput)
    }

    /// A loaded `dora_scale` around the loaded base algorithm.
    private static func decompose(_ adapter: some AdapterAlgorithm, magnitude: Tensor) throws -> any AdapterAlgorithm {
        try DoRA(base: adapter, magnitude: magnitude)
    }

    /// An adapter of this algorithm on `layer` from a file's tensors (by key suffix).
    /// DyLoRA files are LoRA files and load as LoCon.
    public func loadAdapter(layer: LayerSpec, tensors: [String: Tensor], alpha: Float?,
                            baseWeight: Tensor? = nil) throws -> any AdapterAlgorithm {
        try checkAdapts(layer)
        let adapter: any AdapterAlgorithm
        switch self {
        case .locon, .dylora: adapter = try LoCon(layer: layer, tensors: tensors, alpha: alpha)
        case .loha: adapter = try LoHa(layer: layer, tensors: tensors, alpha: alpha)
        case .lokr: adapter = try LoKr(layer: layer, tensors: tensors, alpha: alpha)
        case .ia3: return try IA3(layer: layer, tensors: tensors, alpha: alpha)
        case .norms: return try Norm(layer: layer, tensors: tensors, alpha: alpha)
        case .diagOFT: return try DiagOFT(layer: layer, tensors: tensors, alpha: alpha)
        case .boft: return try BOFT(layer: layer, tensors: tensors, alpha: alpha)
        case .tlora:
            guard let baseWeight else { throw AdapterError("tlora needs the layer's base weight to load (its frozen factors are W0's SVD)") }
            return try TLoRA(layer: layer, tensors: tensors, alpha: alpha, baseWeight: baseWeight)
        case .glora: return try GLoRA(layer: layer, tensors: tensors, alpha: alpha)
        case .full: return try Full(layer: layer, tensors: tensors, alpha: alpha)
        }
        guard let magnitude = tensors["dora_scale"] else { return adapter }
        return try Self.decompose(adapter, magnitude: magnitude)
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
