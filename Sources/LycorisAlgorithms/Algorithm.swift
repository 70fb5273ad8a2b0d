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
}
