import LycorisCore
import LycorisFormats

/// Merges an adapter file into one model's state dict: W' = W0 + m·ΔW per adapted layer,
/// with ΔW as the adapter's *forward* computes it (LyCORIS 4.1.3's own merge applies the
/// LoHa/LoKr scale twice; this does not); for algorithms that adapt the bias (norm) also
/// b' = b0 + m·Δb where the base has the bias `a.b.c.bias`. A LoRA/LoCon module's sparse
/// bias (``SparseBias``) is merged too: W' = W0 + m·s·(up·down + S).
///
/// Module `PREFIX_a_b_c` (PREFIX one of ``KeySchema/prefixes``) applies to the base key
/// `a.b.c.weight`: the base keys are flattened the same way and matched exactly, so dots
/// and underscores in model paths cannot be confused.
public enum AdapterMerge {
    public struct Report: Sendable {
        /// (module, base key, algorithm) of every merged module.
        public var merged: [(module: String, baseKey: String, algorithm: Algorithm)] = []
        /// Adapter modules with no matching base weight.
        public var unmatched: [String] = []
        /// Modules that matched but could not be merged, with the reason.
        public var failed: [(module: String, reason: String)] = []
        /// Base bias keys merged too (norm modules).
        public var mergedBiases: [String] = []
        /// Whether the output was written (not with `strict` and a module unmatched or failed).
        public var written = false
    }

    /// The base layer a weight of `shape` belongs to: 2-D linear, 3-D conv1d, 4-D conv2d,
    /// 5-D conv3d (stride, padding and dilation do not enter ΔW; groups are taken as 1, so a
    /// weight (O, C/g, k…) reads as a convolution from C/g channels, the same ΔW).
    public static func layer(forWeightShape shape: [Int]) -> LayerSpec? {
        switch shape.count {
        case 2: return .linear(inFeatures: shape[1], outFeatures: shape[0])
        case 3...5: return .convolution(ConvGeometry(inChannels: shape[1], outChannels: shape[0], kernelSize: Array(shape[2...])))
        default: return nil
        }
    }

    /// Merges `adapter` into `base` and writes `output` atomically (every base tensor, in
    /// order and dtype, merged where an adapter applies). With `strict`, a module that is
    /// unmatched or cannot be merged means nothing is written (``Report/written`` false).
    public static func merge(basePath: String, adapterPath: String, outputPath: String, multiplier: Float = 1,
                             strict: Bool = false) throws -> Report {
        guard multiplier.isFinite else { throw AdapterError("multiplier must be finite") }
        let base = try SafetensorsFile(path: basePath)
        let adapter = try AdapterFile(path: adapterPath)
        var baseKeyByPath: [String: String] = [:]
        for info in base.tensors {
            if let path = KeySchema.flattenedModulePath(ofWeightKey: info.name) { baseKeyByPath[path] = info.name }
        }
        var report = Report()
        var mergedTensors: [String: Tensor] = [:]
        for module in adapter.modules {
            let (_, path) = KeySchema.stripPrefix(module.name)
            guard let baseKey = baseKeyByPath[path], let info = base.info(baseKey) else {
                report.unmatched.append(module.name)
                continue
            }
            do {
                guard info.dtype.isFloatingPoint else { throw AdapterError("base weight \(baseKey) is \(info.dtype.rawValue), not a float") }
                guard let algorithm = module.algorithm else { throw AdapterError("no known algorithm has the keys \(module.tensors.keys.sorted())") }
                let biasKey = String(baseKey.dropLast("weight".count)) + "bias"
                let biasInfo = base.info(biasKey).flatMap { $0.dtype.isFloatingPoint ? $0 : nil }
                let (result, bias) = try mergedLayer(module, of: adapter, baseWeight: try base.tensor(baseKey), weightKey: baseKey,
                                                     baseBias: try biasInfo.map { try base.tensor($0.name) }, multiplier: multiplier)
                mergedTensors[baseKey] = result
                if let bias {
                    mergedTensors[biasKey] = bias
                    report.mergedBiases.append(biasKey)
                }
                report.merged.append((module.name, baseKey, algorithm))
            } catch {
                report.failed.append((module.name, "\(error)"))
            }
        }
        if strict && (!report.unmatched.isEmpty || !report.failed.isEmpty) { return report }
        var writer = SafetensorsWriter(metadata: base.metadata)
        for info in base.tensors {
            if let merged = mergedTensors[info.name] {
                try writer.add(info.name, merged, as: info.dtype)
            } else {
                try writer.addRaw(info.name, dtype: info.dtype, shape: info.shape, bytes: base.rawBytes(info.name))
            }
        }
        try writer.write(toPath: outputPath)
        report.written = true
        return report
    }

    /// One module merged into one base layer: (W0 + m·ΔW, b0 + m·Δb or nil when the algorithm
    /// does not adapt the bias). The layer is read from the weight's shape (``layer(forWeightShape:)``),
    /// or is a norm for norm modules; `weightKey` only names the weight in errors.
    public static func mergedLayer(_ module: AdapterFile.Module, of adapter: AdapterFile, baseWeight: Tensor, weightKey: String,
                                   baseBias: Tensor?, multiplier: Float) throws -> (weight: Tensor, bias: Tensor?) {
        guard let algorithm = module.algorithm else { throw AdapterError("no known algorithm has the keys \(module.tensors.keys.sorted())") }
        // A norm's ΔW is its weight reshaped: the normalisation kind does not enter it.
        let normalization = Normalization(kind: .layer(normalizedShape: baseWeight.shape), hasBias: baseBias != nil)
        guard let layer = algorithm == .norms ? .norm(normalization) : layer(forWeightShape: baseWeight.shape) else {
            throw AdapterError("base weight \(weightKey) has shape \(baseWeight.shape); only linear, conv1d/conv2d/conv3d and norm weights are merged")
        }
        let algorithmOnLayer = try adapter.adapter(for: module, layer: layer, baseWeight: baseWeight)
        var merged = AdapterModule(name: module.name, algorithm: algorithmOnLayer,
                                   options: AdapterOptions(), baseWeight: baseWeight, baseBias: baseBias)
        merged.multiplier = multiplier
        var result = try merged.mergedWeight()
        if let sparse = try SparseBias(adapter.tensors(of: module, suffixes: SparseBias.suffixes)) {
            // ΔW = s·(up·down + S): the sparse part is added with the factors' scale.
            guard let locon = algorithmOnLayer as? LoCon, module.tensors["dora_scale"] == nil, module.tensors["scalar"] == nil else {
                throw AdapterError("a sparse bias (bias_indices/bias_values/bias_size) is merged on plain LoRA/LoCon modules only, not \(algorithm.rawValue)"
                                   + (module.tensors["dora_scale"] != nil ? " with DoRA" : ""))
            }
            result = result + (try sparse.dense(shape: baseWeight.shape)) * (multiplier * locon.scale)
        }
        let bias = try merged.mergedBias()
        guard result.isFinite, bias?.isFinite ?? true else { throw AdapterError("the merged weight has non-finite values") }
        return (result, bias)
    }
}
