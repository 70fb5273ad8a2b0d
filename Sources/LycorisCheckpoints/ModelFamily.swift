import LycorisAlgorithms

/// The Stable Diffusion families whose checkpoints `lycoris` reads, and how kohya names
/// their layers:
///
/// | family | UNet names | text encoders |
/// |---|---|---|
/// | `sd1` | `lora_unet_` + diffusers path | `lora_te_` + transformers CLIP path |
/// | `sd2` | `lora_unet_` + diffusers path | `lora_te_` + transformers CLIP path (OpenCLIP converted) |
/// | `sdxl` | `lora_unet_` + LDM path | `lora_te1_`, `lora_te2_` + transformers CLIP paths |
public enum ModelFamily: String, Sendable, CaseIterable {
    case sd1, sd2, sdxl

    /// Whether kohya spells this family's UNet modules by their LDM paths (SDXL, from
    /// sd-scripts' `sdxl_original_unet`) rather than their diffusers paths.
    public var unetNamesAreLDM: Bool { self == .sdxl }

    /// The kohya prefix of a component's modules.
    public func prefix(of component: CheckpointComponent) -> String {
        switch component {
        case .unet: KeySchema.unetPrefix
        case .textEncoder: self == .sdxl ? KeySchema.textEncoder1Prefix : KeySchema.textEncoderPrefix
        case .textEncoder2: KeySchema.textEncoder2Prefix
        }
    }

    /// The key prefix of a component in this family's single-file checkpoints, and whether
    /// the text encoder under it is OpenCLIP-spelled.
    public func singleFilePrefix(of component: CheckpointComponent) -> (prefix: String, openCLIP: Bool) {
        switch (self, component) {
        case (_, .unet): ("model.diffusion_model.", false)
        case (.sd1, _): ("cond_stage_model.transformer.", false)
        case (.sd2, _): ("cond_stage_model.model.", true)
        case (.sdxl, .textEncoder): ("conditioner.embedders.0.transformer.", false)
        case (.sdxl, .textEncoder2): ("conditioner.embedders.1.model.", true)
        }
    }

    /// kohya's `ss_base_model_version` metadata value.
    public var baseModelVersion: String {
        switch self {
        case .sd1: "sd_v1"
        case .sd2: "sd_v2"
        case .sdxl: "sdxl_base_v1-0"
        }
    }

    /// The family a checkpoint's tensors show (keys and shapes): SDXL has a second text
    /// encoder or the UNet's `label_emb`/`add_embedding`; SD2 an OpenCLIP text encoder or
    /// linear (2-D) `proj_in` projections; SD1 otherwise. A single file is an SD checkpoint
    /// only with LDM prefixes (`model.diffusion_model.`, …): bare keys are a plain state dict
    /// (nil); a diffusers folder's keys are bare by nature (`prefixed` false).
    public static func detect(_ shapes: [String: [Int]], prefixed: Bool = true) -> ModelFamily? {
        let keys = shapes.keys
        let isSD = !prefixed || keys.contains { CheckpointComponent.split(singleFileKey: $0) != nil }
        guard isSD else { return nil }
        if keys.contains(where: {
            $0.hasPrefix("conditioner.embedders.1.") || $0.contains("label_emb.0.0.") || $0.hasPrefix("add_embedding.")
        }) { return .sdxl }
        if keys.contains(where: { $0.hasPrefix("cond_stage_model.model.") }) { return .sd2 }
        if shapes.contains(where: { $0.key.hasSuffix(".proj_in.weight") && $0.value.count == 2 }) { return .sd2 }
        return .sd1
    }
}

/// The adaptable parts of a Stable Diffusion checkpoint.
public enum CheckpointComponent: String, Sendable, CaseIterable {
    case unet
    case textEncoder = "text_encoder"
    case textEncoder2 = "text_encoder_2"

    /// The folder of a diffusers pipeline holding the component.
    public var folder: String { rawValue }

    /// The key prefixes of the component in single-file (LDM) checkpoints, with whether the
    /// keys after it are OpenCLIP's (else transformers' or the LDM UNet's).
    public var singleFilePrefixes: [String] {
        switch self {
        case .unet: ["model.diffusion_model."]
        case .textEncoder: ["cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders.0.transformer."]
        case .textEncoder2: ["conditioner.embedders.1.model."]
        }
    }

    /// The component and stripped key of a single-file key, and whether the stripped key is
    /// OpenCLIP-spelled (nil for VAE and other non-adaptable keys).
    public static func split(singleFileKey key: String) -> (component: CheckpointComponent, key: String, openCLIP: Bool)? {
        for component in allCases {
            for prefix in component.singleFilePrefixes where key.hasPrefix(prefix) {
                return (component, String(key.dropFirst(prefix.count)), prefix.hasSuffix(".model."))
            }
        }
        return nil
    }
}
