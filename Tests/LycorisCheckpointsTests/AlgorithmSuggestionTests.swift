import LycorisAlgorithms
import LycorisCheckpoints
import Testing

@Suite("algorithm suggestion")
struct AlgorithmSuggestionTests {
    /// Every candidate of the documented rule, enumerated independently: LoRA r, LoHa r
    /// (rank min(m, r²)), LoKr with the first factor of LyCORIS's factor −1 or (f, f) for a
    /// common divisor f with f² ≤ min(out, in).
    static func bruteForceCost(shape: [Int], rank wanted: Int) -> Int {
        let (out, inChannels, kernel) = (shape[0], shape[1], shape.dropFirst(2).reduce(1, *))
        let n = inChannels * kernel, full = min(out, n), target = min(wanted, full)
        var best = Int.max
        for r in 1...full {
            if r >= target { best = min(best, r * (out + n)) }
            if min(full, r * r) >= target { best = min(best, 2 * r * (out + n)) }
        }
        var firstFactors = [(factorization(out).m, factorization(inChannels).m)]
        for f in 1...min(out, inChannels) where out % f == 0 && inChannels % f == 0 && f * f <= min(out, inChannels) {
            firstFactors.append((f, f))
        }
        for (a1, b1) in firstFactors where min(a1, b1) * min(out / a1, n / b1) >= target {
            best = min(best, a1 * b1 + (out / a1) * (n / b1))
        }
        return best
    }

    @Test("the cheapest candidate reaching the rank", arguments: [[12, 8], [30, 18], [7, 5], [16, 8, 3, 3], [9, 4, 1, 1]])
    func cheapest(_ shape: [Int]) {
        let full = min(shape[0], shape.dropFirst().reduce(1, *))
        for rank in 1...full {
            let choice = AlgorithmSuggestion.cheapest(shape: shape, rank: rank)
            #expect(choice.attainableRank >= rank, "\(shape) r\(rank): \(choice)")
            #expect(choice.parameters == Self.bruteForceCost(shape: shape, rank: rank), "\(shape) r\(rank): \(choice)")
        }
    }

    @Test("a prime-sized layer: LoRA for a low rank; the 1×1 ⊗ full LoKr (a whole ΔW) once that is cheaper")
    func prime() {
        let low = AlgorithmSuggestion.cheapest(shape: [7, 5], rank: 2)
        #expect(low.algorithm == .locon && low.rank == 2 && low.parameters == 24)
        let high = AlgorithmSuggestion.cheapest(shape: [7, 5], rank: 4)
        #expect(high.algorithm == .lokr && high.parameters == 36 && high.attainableRank == 5)
    }

    @Test("plans fit the budget, a larger budget never lowers the target, a too-small one is refused")
    func budgets() throws {
        let layers = [[7, 5], [13, 11], [17, 3, 3, 3], [11, 7]].enumerated().map { AlgorithmSuggestion.Layer(name: "l\($0.offset)", shape: $0.element) }
        var previous = -1.0
        for budget in [200, 300, 500, 800, 2000] {
            let plan = try AlgorithmSuggestion.plan(layers, budget: budget)
            #expect(plan.parameters <= budget && plan.parameters == plan.layers.reduce(0) { $0 + $1.choice.parameters })
            #expect(plan.target >= previous)
            previous = plan.target
        }
        #expect(throws: CheckpointError.self) { try AlgorithmSuggestion.plan(layers, budget: 50) }
    }
}
