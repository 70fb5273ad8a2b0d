import LycorisCore
import LycorisFormats

/// One adapter module merged into one layer: W' = W0 + m·ΔW, with ΔW as the adapter's
/// *forward* computes it (LyCORIS 4.1.3's own merge applies the LoHa/LoKr scale twice; this
/// does not); for algorithms that adapt the bias (norm) also b' = b0 + m·Δb. A LoRA/LoCon
/// module's sparse bias (``SparseBias``) is merged too: W' = W0 + m·s·(up·down + S).
/// Matching modules to a checkpoint's layers and writing the merged file is
/// `CheckpointMerge`'s (LycorisCheckpoints), the one merge path of the product.
public enum AdapterMerge {
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
