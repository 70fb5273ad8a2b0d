import LycorisAlgorithms

/// `lycoris suggest`: per layer the LoRA, LoHa or LoKr configuration that reaches a rank of
/// ΔW at the fewest parameters, with one rank target for the whole model raised as far as
/// the budget allows.
///
/// A layer's weight is read as the matrix (out, n), n = in·kh·kw, of full rank
/// m = min(out, n). For a wanted rank R ≤ m the candidates and what they attain:
/// - LoRA of rank r: r·(out + n) parameters, rank r — so r = R;
/// - LoHa of rank r: 2·r·(out + n) parameters, rank up to r² (the Hadamard product of two
///   rank-r matrices) — so r = ⌈√R⌉;
/// - LoKr with both halves full: W = A ⊗ B, A (a₁, b₁), B (out/a₁, n/b₁), a₁ | out and
///   b₁ | in (the kernel stays in B), a₁·b₁ + (out/a₁)·(n/b₁) parameters, rank
///   min(a₁, b₁)·min(out/a₁, n/b₁) (the rank of a Kronecker product is the product of ranks).
/// The cheapest candidate with attainable rank ≥ R is chosen (ties: LoRA, then LoHa, then
/// LoKr — the simpler one). The model-wide target is a fraction ρ of each layer's full rank,
/// R = max(1, ⌈ρ·m⌉); ρ is the largest (to 1e-6) whose plan fits the budget.
public enum AlgorithmSuggestion {
    public struct Choice: Sendable, Equatable {
        public var algorithm: Algorithm
        /// LoRA/LoHa dimension; for LoKr the first factor's shape (a₁, b₁).
        public var rank: Int
        public var factor: (Int, Int)?
        public var attainableRank: Int
        public var parameters: Int

        public static func == (a: Choice, b: Choice) -> Bool {
            a.algorithm == b.algorithm && a.rank == b.rank && a.factor?.0 == b.factor?.0 && a.factor?.1 == b.factor?.1
                && a.attainableRank == b.attainableRank && a.parameters == b.parameters
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
        var best = Choice(algorithm: .locon, rank: target, factor: nil, attainableRank: target, parameters: target * (out + n))
        let hadamard = Int(Double(target).squareRoot().rounded(.up))
        let loha = Choice(algorithm: .loha, rank: hadamard, factor: nil, attainableRank: min(full, hadamard * hadamard),
                          parameters: 2 * hadamard * (out + n))
        if loha.parameters < best.parameters { best = loha }
        for a1 in divisors(out) {
            for b1 in divisors(inChannels) {
                let (a2, b2) = (out / a1, n / b1)
                let rank = min(a1, b1) * min(a2, b2)
                let parameters = a1 * b1 + a2 * b2
                if rank >= target && parameters < best.parameters {
                    best = Choice(algorithm: .lokr, rank: min(a1, b1), factor: (a1, b1), attainableRank: min(full, rank), parameters: parameters)
                }
            }
        }
        return best
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
}
