/// The adapter algorithms of the LyCORIS family, with their file-key signatures.
public enum Algorithm: String, Sendable, CaseIterable, Codable {
    case locon, loha, lokr, ia3, dylora, glora, full, diagOFT = "diag-oft", boft, norms, tlora

    /// Detects a module's algorithm from the key suffixes it has in a file, in LyCORIS's
    /// detection order (LoCon, LoHa, IA3, LoKr, Full, Norms, OFT, BOFT, GLoRA, T-LoRA).
    /// `oftBlocksRank` tells diag-OFT (3-D `oft_blocks`) from BOFT (4-D).
    public static func detect(suffixes: Set<String>, oftBlocksRank: Int? = nil) -> Algorithm? {
        if suffixes.contains("lora_up.weight") { return .locon }
        if suffixes.contains("hada_w1_a") { return .loha }
        if suffixes.contains("on_input") { return .ia3 }
        if suffixes.contains("lokr_w1") || suffixes.contains("lokr_w1_a") { return .lokr }
        if suffixes.contains("diff") { return .full }
        if suffixes.contains("w_norm") { return .norms }
        if suffixes.contains("oft_blocks") { return oftBlocksRank == 4 ? .boft : .diagOFT }
        if suffixes.contains("a1.weight") { return .glora }
        if suffixes.contains("lambda_layer") { return .tlora }
        return nil
    }

    /// Every key suffix a module of this algorithm may carry in a file.
    public var fileSuffixes: [String] {
        switch self {
        case .locon, .dylora: ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "scalar"]
        case .loha: ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"]
        case .lokr: ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2", "alpha", "dora_scale"]
        case .ia3: ["weight", "on_input"]
        case .glora: ["a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"]
        case .full: ["diff", "diff_b"]
        case .diagOFT, .boft: ["oft_blocks", "rescale", "alpha"]
        case .norms: ["w_norm", "b_norm"]
        case .tlora: ["q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"]
        }
    }
}
