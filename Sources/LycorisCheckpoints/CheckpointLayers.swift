import LycorisAlgorithms
import LycorisFormats

/// One adaptable layer of a checkpoint: its kohya module name and where its weight is.
public struct AdaptableLayer: Sendable, Equatable {
    /// The kohya / A1111 module name (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`).
    public var name: String
    /// Other names loaders accept for it: for UNet layers the module spelled in the other
    /// layout (ComfyUI reads both `lora_unet_<LDM path>` and `lora_unet_<diffusers path>`).
    public var aliases: [String]
    /// nil for a plain state dict.
    public var component: CheckpointComponent?
    /// Index into ``Checkpoint/parts``.
    public var part: Int
    /// The weight's key in its file.
    public var weightKey: String
    /// The bias's key, when there is one, and its part (shards may split weight and bias).
    public var biasKey: String?
    public var biasPart: Int?
    /// The rows of the weight (and bias) that are this layer: a third of OpenCLIP's fused
    /// `in_proj` for `q_proj`/`k_proj`/`v_proj`; nil for the whole tensor.
    public var rows: Range<Int>?
    /// The weight's key in the other layout (single-file LDM key for a diffusers folder and
    /// the reverse; the transformers key of an OpenCLIP slice); nil for a plain state dict.
    public var otherLayoutKey: String?
}

extension Checkpoint {
    /// A layer's weight shape: its tensor's, with the row count of its block of a fused
    /// tensor; empty when the key is missing.
    public func weightShape(of layer: AdaptableLayer) -> [Int] {
        var shape = parts[layer.part].file.info(layer.weightKey)?.shape ?? []
        if let rows = layer.rows, !shape.isEmpty { shape[0] = rows.count }
        return shape
    }
}

/// Every adaptable layer of a checkpoint with its kohya name — the one table that
/// `merge`, `extract` and `layers` use.
///
/// Adaptable: each weight (`….weight`, and OpenCLIP's `in_proj_weight` split in three) of a
/// UNet or text-encoder Linear, Conv or norm layer, that is every UNet weight the LDM ⇄
/// diffusers mapping covers and every text-encoder weight under
/// `text_model.encoder.layers.` or `text_model.final_layer_norm` (embeddings and
/// `text_projection` are not). A checkpoint that is no SD family (a plain state dict) names
/// each `a.b.c.weight` as `a_b_c` behind any of ``KeySchema/prefixes``.
public struct CheckpointLayers: Sendable {
    public let family: ModelFamily?
    public let layers: [AdaptableLayer]
    private let byName: [String: Int]

    /// The layers of `checkpoint`; `family` overrides the detected one (`--model-type`).
    public init(_ checkpoint: Checkpoint, family override: ModelFamily? = nil) throws {
        let detected = checkpoint.parts.contains { $0.component == .textEncoder2 } ? .sdxl
            : ModelFamily.detect(checkpoint.shapes, prefixed: checkpoint.layout == .singleFile)
        let family = override ?? detected
        self.family = family
        var layers: [AdaptableLayer] = []
        // Where each key is, per component (a folder's shards) or in the one file.
        var partOfKey: [String: Int] = [:]
        for (index, part) in checkpoint.parts.enumerated() {
            for info in part.file.tensors { partOfKey[(part.component?.rawValue ?? "") + "/" + info.name] = index }
        }
        func biasLocation(_ weightKey: String, _ part: Int) -> (key: String, part: Int)? {
            guard weightKey.hasSuffix("weight") else { return nil }
            let key = String(weightKey.dropLast("weight".count)) + "bias"
            return partOfKey[(checkpoint.parts[part].component?.rawValue ?? "") + "/" + key].map { (key, $0) }
        }
        for (index, part) in checkpoint.parts.enumerated() {
            let file = part.file
            guard let family else {
                for info in file.tensors {
                    guard let path = KeySchema.flattenedModulePath(ofWeightKey: info.name) else { continue }
                    let bias = biasLocation(info.name, index)
                    layers.append(AdaptableLayer(name: path, aliases: [], component: nil, part: index, weightKey: info.name,
                                                 biasKey: bias?.key, biasPart: bias?.part, rows: nil, otherLayoutKey: nil))
                }
                continue
            }
            let unetKeys = file.tensors.map(\.name).compactMap { key -> String? in
                if let component = part.component { return component == .unet ? key : nil }
                return CheckpointComponent.split(singleFileKey: key).flatMap { $0.component == .unet ? $0.key : nil }
            }
            let unet = UNetNaming(keys: unetKeys)
            for info in file.tensors {
                for var layer in Self.layers(of: info, in: file, part: index, component: part.component, family: family, unet: unet) {
                    // OpenCLIP's in_proj_bias is not `weight` → `bias`; it is set already.
                    let bias = layer.biasKey.map { ($0, index) } ?? biasLocation(layer.weightKey, index)
                    (layer.biasKey, layer.biasPart) = (bias?.0, bias?.1)
                    layers.append(layer)
                }
            }
        }
        var byName: [String: Int] = [:]
        for (index, layer) in layers.enumerated() {
            guard byName[layer.name] == nil else { throw CheckpointError("two tensors are named \(layer.name)") }
            byName[layer.name] = index
        }
        for (index, layer) in layers.enumerated() {
            for alias in layer.aliases where byName[alias] == nil { byName[alias] = index }
        }
        self.layers = layers
        self.byName = byName
    }

    /// The layer an adapter module applies to (by name or alias; for a plain state dict the
    /// name behind any known prefix).
    public func layer(named module: String) -> AdaptableLayer? {
        if family == nil {
            let (prefix, path) = KeySchema.stripPrefix(module)
            return prefix == nil ? nil : byName[path].map { layers[$0] }
        }
        return byName[module].map { layers[$0] }
    }

    /// The prefixes and spellings a module name is looked for under, for error messages.
    public var namingDescription: String {
        guard let family else { return "\(KeySchema.prefixes.joined(separator: ", ")) + the state dict's key path" }
        let components = Set(layers.compactMap(\.component))
        return CheckpointComponent.allCases.filter { components.contains($0) }.map { component in
            let prefix = family.prefix(of: component)
            return component == .unet ? "\(prefix) + UNet path (\(family.unetNamesAreLDM ? "LDM, or diffusers" : "diffusers, or LDM"))"
                : "\(prefix) + \(component.rawValue) transformers path"
        }.joined(separator: "; ")
    }

    private static func moduleName(_ prefix: String, _ weightKey: String) -> String {
        let path = weightKey.hasSuffix(".weight") ? String(weightKey.dropLast(".weight".count)) : weightKey
        return KeySchema.moduleName(prefix: prefix, path: path)
    }

    /// Whether a transformers text-encoder key is an adaptable weight.
    private static func isTextEncoderWeight(_ key: String) -> Bool {
        key.hasSuffix(".weight") && (key.hasPrefix("text_model.encoder.layers.") || key.hasPrefix("text_model.final_layer_norm."))
    }

    private static func layers(of info: TensorInfo, in file: SafetensorsFile, part: Int, component partComponent: CheckpointComponent?,
                               family: ModelFamily, unet: UNetNaming) -> [AdaptableLayer] {
        let key = info.name
        // (component, key inside the component, whether OpenCLIP-spelled, single-file prefix)
        let located: (CheckpointComponent, String, Bool, String)
        if let partComponent {
            located = (partComponent, key, false, "")
        } else {
            guard let (component, inner, openCLIP) = CheckpointComponent.split(singleFileKey: key) else { return [] }
            located = (component, inner, openCLIP, String(key.dropLast(inner.count)))
        }
        let (component, inner, openCLIP, filePrefix) = located
        let prefix = family.prefix(of: component)
        let otherPrefix = family.singleFilePrefix(of: component)
        switch (component, openCLIP) {
        case (.unet, _):
            guard inner.hasSuffix(".weight") else { return [] }
            let isFolder = partComponent != nil
            guard let other = isFolder ? unet.ldmKey(diffusers: inner) : unet.diffusersKey(ldm: inner) else { return [] }
            let (ldm, diffusers) = isFolder ? (other, inner) : (inner, other)
            let names = [moduleName(prefix, ldm), moduleName(prefix, diffusers)]
            let ordered = family.unetNamesAreLDM ? names : names.reversed()
            return [AdaptableLayer(name: ordered[0], aliases: ordered[0] == ordered[1] ? [] : [ordered[1]], component: component,
                                   part: part, weightKey: key, biasKey: nil, biasPart: nil, rows: nil,
                                   otherLayoutKey: isFolder ? otherPrefix.prefix + ldm : diffusers)]
        case (_, false):
            // transformers 5 saves CLIPTextModel without the `text_model.` level; kohya's names have it.
            let inner = partComponent != nil && (inner.hasPrefix("encoder.") || inner.hasPrefix("final_layer_norm.")) ? "text_model." + inner : inner
            guard isTextEncoderWeight(inner) else { return [] }
            var other = otherPrefix.prefix + inner
            if partComponent == nil {
                other = inner
            } else if otherPrefix.openCLIP {
                guard let (openCLIPKey, _) = TextEncoderNaming.openCLIPKey(transformers: inner) else { return [] }
                other = otherPrefix.prefix + openCLIPKey
            }
            return [AdaptableLayer(name: moduleName(prefix, inner), aliases: [], component: component, part: part, weightKey: key,
                                   biasKey: nil, biasPart: nil, rows: nil, otherLayoutKey: other)]
        case (_, true):
            guard inner.hasSuffix("weight") else { return [] }
            let biasInner = inner.hasSuffix("in_proj_weight") ? String(inner.dropLast("weight".count)) + "bias" : nil
            return TextEncoderNaming.transformersSlices(openCLIP: inner, rows: info.shape.first ?? 0).map { slice in
                let biasKey = biasInner.map { filePrefix + $0 }.flatMap { file.contains($0) ? $0 : nil }
                return AdaptableLayer(name: moduleName(prefix, slice.key), aliases: [], component: component, part: part,
                                      weightKey: key, biasKey: biasKey, biasPart: nil, rows: slice.rows, otherLayoutKey: slice.key)
            }
        }
    }
}
