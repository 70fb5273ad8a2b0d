/// Options of one adapter module: LyCORIS's constructor arguments (kohya `network_args`
/// names in the comments).
public struct AdapterOptions: Sendable, Equatable, Codable {
    /// Rank r (`network_dim` / `conv_dim`, LyCORIS `lora_dim`).
    public var rank: Int = 4
    /// α (`network_alpha`); nil or 0 means α = r.
    public var alpha: Float? = 1
    /// Tucker decomposition of k×k kernels (`use_tucker`, aliases `use_cp`, `use_conv_cp`).
    public var useTucker = false
    /// A trainable scalar in front of ΔW starting at 0 (`use_scalar`).
    public var useScalar = false
    /// Rank-stabilised scale α/√r (`rs_lora`).
    public var rsLoRA = false
    /// LoKr: factorise w1 too (`decompose_both`).
    public var decomposeBoth = false
    /// LoKr: factorisation factor, −1 = automatic (`factor`).
    public var factor = -1
    /// LoKr: keep w2 (and w1) full (`full_matrix`).
    public var fullMatrix = false
    /// LoKr: swap the output factors (`unbalanced_factorization`).
    public var unbalancedFactorization = false
    /// IA3: scale input channels instead of output channels (`train_on_input`).
    public var trainOnInput = false
    /// DyLoRA: rank block size (`block_size`).
    public var blockSize = 4
    /// Elementwise dropout of the adapter's output (bypass mode only, as in LyCORIS).
    public var dropout: Float = 0
    /// Dropout of ΔW rows (rebuild) or of the rank axis (LoCon bypass); for norm, of the
    /// elements of w_norm and b_norm (one mask).
    public var rankDropout: Float = 0
    /// Probability of skipping the whole adapter for a training step.
    public var moduleDropout: Float = 0
    /// Divide rank-dropout masks by their mean.
    public var rankDropoutScale = false
    /// Compute Δ(x) from the factors (true: LyCORIS's bypass semantics, dropouts included),
    /// from ΔW (false), or — nil — with rebuild semantics, through the factors when that is
    /// the same function and cheaper.
    public var bypassMode: Bool? = nil
    /// Diag-OFT/BOFT: bound on ‖Q‖ per output channel, 0 = none (`constraint`; saved as `alpha`).
    public var constraint: Float = 0
    /// Diag-OFT/BOFT: a trainable per-output-channel `rescale` (`rescaled`).
    public var rescaled = false
    /// T-LoRA: which singular vectors start the factors, principal, last or middle (`sig_type`).
    public var sigType = "principal"
    /// T-LoRA: start from the SVD of W0 (true) or of a random matrix (`use_data_init`).
    public var useDataInit = true
    /// DoRA: decompose W0 + ΔW into direction and a trained magnitude `dora_scale`
    /// (`dora_wd`; LyCORIS `weight_decompose`), on LoCon, LoHa and LoKr.
    public var weightDecompose = false
    /// DoRA: the magnitude runs along output rows (true) or input columns
    /// (`wd_on_output`; LyCORIS `wd_on_out`).
    public var wdOnOutput = true

    public init() {}

    public init(rank: Int, alpha: Float?) {
        self.rank = rank
        self.alpha = alpha
    }

    /// Why these options cannot be used, or nil.
    public var invalidReason: String? {
        if rank <= 0 { return "rank must be positive, got \(rank)" }
        if let alpha, !alpha.isFinite { return "alpha must be finite" }
        for (name, p) in [("dropout", dropout), ("rank_dropout", rankDropout), ("module_dropout", moduleDropout)]
        where !(p >= 0 && p < 1) {
            return "\(name) must be in [0, 1), got \(p)"
        }
        if blockSize <= 0 { return "block_size must be positive" }
        if factor == 0 || factor < -1 { return "factor must be -1 (automatic) or positive, got \(factor)" }
        if !(constraint.isFinite && constraint >= 0) { return "constraint must be finite and >= 0, got \(constraint)" }
        if TLoRA.Selection(rawValue: sigType) == nil { return "sig_type must be principal, last or middle, got \(sigType)" }
        return nil
    }
}

/// The scale rule shared by LoCon, LoHa and LoKr (LyCORIS `LycorisBaseModule`):
/// α_eff = r when α is nil or 0; r_f = √r with rs_lora, else r;
/// scale = α_eff / r_f; the saved alpha is α_eff·r/r_f so that a plain loader's
/// alpha/r reproduces the scale.
struct ScaleRule: Sendable, Equatable {
    let scale: Float
    let savedAlpha: Float

    init(alpha: Float?, rank: Int, rsLoRA: Bool) {
        let effective = (alpha ?? 0) == 0 ? Float(rank) : alpha!
        let rankFactor = rsLoRA ? Float(rank).squareRoot() : Float(rank)
        scale = effective / rankFactor
        savedAlpha = effective * (Float(rank) / rankFactor)
    }

    /// The rule of a module loaded from a file: scale = alpha/r.
    init(fileAlpha: Float?, rank: Int) { self.init(alpha: fileAlpha, rank: rank, rsLoRA: false) }
}

extension AdapterOptions {
    /// The LyCORIS keyword-argument names (the wire and file names of every option).
    enum CodingKeys: String, CodingKey, CaseIterable {
        case rank = "lora_dim", alpha, useTucker = "use_tucker", useScalar = "use_scalar", rsLoRA = "rs_lora"
        case decomposeBoth = "decompose_both", factor, fullMatrix = "full_matrix"
        case unbalancedFactorization = "unbalanced_factorization", trainOnInput = "train_on_input"
        case blockSize = "block_size", dropout, rankDropout = "rank_dropout", moduleDropout = "module_dropout"
        case rankDropoutScale = "rank_dropout_scale", bypassMode = "bypass_mode"
        case constraint, rescaled
        case sigType = "sig_type", useDataInit = "use_data_init"
        case weightDecompose = "weight_decompose", wdOnOutput = "wd_on_out"
    }

    /// Every option's name as LyCORIS spells it (`lora_dim`, `alpha`, `use_tucker`, …).
    public static var optionNames: [String] { CodingKeys.allCases.map(\.rawValue) }

    /// Decodes LyCORIS keyword arguments; a missing key keeps its default.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        rank = try c.decodeIfPresent(Int.self, forKey: .rank) ?? rank
        alpha = try c.decodeIfPresent(Float.self, forKey: .alpha) ?? (c.contains(.alpha) ? nil : alpha)
        useTucker = try c.decodeIfPresent(Bool.self, forKey: .useTucker) ?? useTucker
        useScalar = try c.decodeIfPresent(Bool.self, forKey: .useScalar) ?? useScalar
        rsLoRA = try c.decodeIfPresent(Bool.self, forKey: .rsLoRA) ?? rsLoRA
        decomposeBoth = try c.decodeIfPresent(Bool.self, forKey: .decomposeBoth) ?? decomposeBoth
        factor = try c.decodeIfPresent(Int.self, forKey: .factor) ?? factor
        fullMatrix = try c.decodeIfPresent(Bool.self, forKey: .fullMatrix) ?? fullMatrix
        unbalancedFactorization = try c.decodeIfPresent(Bool.self, forKey: .unbalancedFactorization) ?? unbalancedFactorization
        trainOnInput = try c.decodeIfPresent(Bool.self, forKey: .trainOnInput) ?? trainOnInput
        blockSize = try c.decodeIfPresent(Int.self, forKey: .blockSize) ?? blockSize
        dropout = try c.decodeIfPresent(Float.self, forKey: .dropout) ?? dropout
        rankDropout = try c.decodeIfPresent(Float.self, forKey: .rankDropout) ?? rankDropout
        moduleDropout = try c.decodeIfPresent(Float.self, forKey: .moduleDropout) ?? moduleDropout
        rankDropoutScale = try c.decodeIfPresent(Bool.self, forKey: .rankDropoutScale) ?? rankDropoutScale
        bypassMode = try c.decodeIfPresent(Bool.self, forKey: .bypassMode)
        constraint = try c.decodeIfPresent(Float.self, forKey: .constraint) ?? constraint
        rescaled = try c.decodeIfPresent(Bool.self, forKey: .rescaled) ?? rescaled
        sigType = try c.decodeIfPresent(String.self, forKey: .sigType) ?? sigType
        useDataInit = try c.decodeIfPresent(Bool.self, forKey: .useDataInit) ?? useDataInit
        weightDecompose = try c.decodeIfPresent(Bool.self, forKey: .weightDecompose) ?? weightDecompose
        wdOnOutput = try c.decodeIfPresent(Bool.self, forKey: .wdOnOutput) ?? wdOnOutput
    }
}
