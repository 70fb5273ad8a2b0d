import LycorisAlgorithms
import LycorisCore

/// `lycoris suggest`, `network.suggest` and `algo=auto`: per layer the LoRA, LoHa or LoKr
/// configuration that reaches a rank of ΔW at the fewest parameters, with one rank target
/// for the whole model raised as far as the budget allows.
///
/// A layer's weight is read as the matrix (out, n), n = in·kh·kw, of full rank
/// m = min(out, n). For a wanted rank R ≤ m the candidates and what they attain:
/// - LoRA of rank r: r·(out + n) parameters, rank r — so r = R;
/// - LoHa of rank r: 2·r·(out + n) parameters, rank up to r² (the Hadamard product of two
///   rank-r matrices) — so r = ⌈√R⌉;
/// - LoKr with both halves full (`full_matrix`): W = A ⊗ B, A (a₁, b₁), B (out/a₁, n/b₁),
///   a₁·b₁ + (out/a₁)·(n/b₁) parameters, rank min(a₁, b₁)·min(out/a₁, n/b₁) (the rank of a
///   Kronecker product is the product of ranks). The shapes are those LyCORIS's `factor`
///   option builds and its loader reads back: factor −1 (a₁, b₁ = the smaller halves of
///   factorization(out), factorization(in); the kernel stays in B), and every f dividing
///   out and in with f² ≤ min(out, in) (a₁ = b₁ = f: full rank min(out, n)).
/// The cheapest candidate with attainable rank ≥ R is chosen (ties: LoRA, then LoHa, then
/// LoKr — the simpler one). The model-wide target is a fraction ρ of each layer's full rank,
/// R = max(1, ⌈ρ·m⌉); ρ is the largest (to 1e-6) whose plan fits the budget.
public enum AlgorithmSuggestion {
    public struct Choice: Sendable, Equatable {
        public var algorithm: Algorithm
        /// LoRA/LoHa dimension; for LoKr min(a₁, b₁).
        public var rank: Int
        /// LoKr: the first factor's shape (a₁, b₁) and the `factor` option that builds it.
        public var factor: (Int, Int)?
        public var lokrFactor: Int?
        public var attainableRank: Int
        public var parameters: Int

        public static func == (a: Choice, b: Choice) -> Bool {
            a.algorithm == b.algorithm && a.rank == b.rank && a.factor?.0 == b.factor?.0 && a.factor?.1 == b.factor?.1
                && a.lokrFactor == b.lokrFactor && a.attainableRank == b.attainableRank && a.parameters == b.parameters
        }
    }

    public struct Layer: Sendable {
        public var name: String
        public var shape: [Int]
        public init(name: String, shape: [Int]) {
            self.name = name
            self.shape = shape
        }
    }

    public struct Plan: Sendable {
        public var layers: [(layer: Layer, choice: Choice)]
        public var parameters: Int
        public var budget: Int
        /// ρ: the fraction of each layer's full rank every layer attains at least.
        public var target: Double
    }

    /// The cheapest configuration of a (out, in[, kh, kw]) layer attaining rank ≥ `wanted`.
    public static func cheapest(shape: [Int], rank wanted: Int) -> Choice {
        let (out, inChannels) = (shape[0], shape[1])
        let kernel = shape.dropFirst(2).reduce(1, *)
        let n = inChannels * kernel
        let full = min(out, n)
        let target = min(max(1, wanted), full)
        var best = Choice(algorithm: .locon, rank: target, factor: nil, lokrFactor: nil, attainableRank: target,
                          parameters: target * (out + n))
        let hadamard = Int(Double(target).squareRoot().rounded(.up))
        let loha = Choice(algorithm: .loha, rank: hadamard, factor: nil, lokrFactor: nil, attainableRank: min(full, hadamard * hadamard),
                          parameters: 2 * hadamard * (out + n))
        if loha.parameters < best.parameters { best = loha }
        for (factor, a1, b1) in kroneckerShapes(out: out, in: inChannels) {
            let (a2, b2) = (out / a1, n / b1)
            let rank = min(a1, b1) * min(a2, b2)
            let parameters = a1 * b1 + a2 * b2
            if rank >= target && parameters < best.parameters {
                best = Choice(algorithm: .lokr, rank: min(a1, b1), factor: (a1, b1), lokrFactor: factor, attainableRank: min(full, rank),
                              parameters: parameters)
            }
        }
        return best
    }

    /// The LoKr first factors (a₁, b₁) considered, with the `factor` option building each:
    /// −1 first, then the common divisors f of out and in with f² ≤ min(out, in).
    public static func kroneckerShapes(out: Int, in inChannels: Int) -> [(factor: Int, a1: Int, b1: Int)] {
        var shapes = [(-1, factorization(out).m, factorization(inChannels).m)]
        for f in divisors(out) where inChannels % f == 0 && f * f <= min(out, inChannels) && (f, f) != (shapes[0].1, shapes[0].2) {
            shapes.append((f, f, f))
        }
        return shapes
    }

    /// The plan with the highest common target fraction that fits `budget` parameters.
    public static func plan(_ layers: [Layer], budget: Int) throws -> Plan {
        func choices(_ fraction: Double) -> [Choice] {
            layers.map { layer in
                let full = min(layer.shape[0], layer.shape.dropFirst().reduce(1, *))
                return cheapest(shape: layer.shape, rank: max(1, Int((fraction * Double(full)).rounded(.up))))
            }
        }
        func cost(_ plan: [Choice]) -> Int { plan.reduce(0) { $0 + $1.parameters } }
        let minimum = cost(choices(0))
        guard minimum <= budget else {
            throw CheckpointError("a budget of \(budget) parameters is too small: rank 1 on every layer needs \(minimum)")
        }
        var (low, high) = (0.0, 1.0)
        if cost(choices(1)) <= budget {
            low = 1
        } else {
            while high - low > 1e-6 {
                let middle = (low + high) / 2
                if cost(choices(middle)) <= budget { low = middle } else { high = middle }
            }
        }
        let best = choices(low)
        return Plan(layers: Array(zip(layers, best)), parameters: cost(best), budget: budget, target: low)
    }

    static func divisors(_ value: Int) -> [Int] { (1...max(1, value)).filter { value % $0 == 0 } }

    /// Parameters for a budget: `N` parameters, or `N[KB|MB|GB|B]` bytes (decimal) ÷ the
    /// size of `dtype`; nil for anything else or a budget that is not positive.
    public static func parameters(budget: String, dtype: DType) -> Int? {
        let units: [(String, Double)] = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)]
        let text = budget.uppercased()
        for (unit, scale) in units where text.hasSuffix(unit) {
            guard let value = Double(text.dropLast(unit.count)), value > 0, value.isFinite else { return nil }
            return Int(value * scale) / dtype.byteSize
        }
        return Int(text).flatMap { $0 > 0 ? $0 : nil }
    }

    /// A plan's layers grouped by block (the kohya name up to its first number), in order.
    public struct Block: Sendable {
        public var name: String
        public var choices: [Choice]
        /// Algorithm → layer count.
        public var algorithms: [String: Int] { Dictionary(grouping: choices, by: { $0.algorithm.rawValue }).mapValues(\.count) }
        public var ranks: ClosedRange<Int> { choices.map(\.attainableRank).min()!...choices.map(\.attainableRank).max()! }
        public var parameters: Int { choices.reduce(0) { $0 + $1.parameters } }
    }

    public static func blocks(_ plan: Plan) -> [Block] {
        var blocks: [Block] = [], index: [String: Int] = [:]
        for (layer, choice) in plan.layers {
            let name = block(of: layer.name)
            if let at = index[name] {
                blocks[at].choices.append(choice)
            } else {
                index[name] = blocks.count
                blocks.append(Block(name: name, choices: [choice]))
            }
        }
        return blocks
    }

    /// The kohya name up to its block index (`lora_unet_down_blocks_1`, `lora_te_text_model_encoder_layers_3`, …).
    public static func block(of name: String) -> String {
        let parts = name.split(separator: "_")
        for (index, part) in parts.enumerated() where Int(part) != nil {
            return parts[...index].joined(separator: "_")
        }
        return name
    }
}
