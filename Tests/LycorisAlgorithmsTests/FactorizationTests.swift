import LycorisAlgorithms
import Testing

/// `factorization(_:factor:)` against LyCORIS's `lycoris.functional.general.factorization`.
@Suite struct FactorizationTests {
    static let factors = [-1, 2, 4, 8, 16, 3]

    /// (dim, [result for each of `factors`]), generated once from the real LyCORIS function:
    ///
    ///     /work/oracle/venv/bin/python -c "
    ///     from lycoris.functional.general import factorization
    ///     for d in [1, 2, 7, 12, 20, 24, 64, 127, 128, 250, 320, 360, 512, 640, 768, 1024, 1280, 2048]:
    ///         print(d, [factorization(d, f) for f in [-1, 2, 4, 8, 16, 3]])"
    ///
    /// (LyCORIS's own docstring table is stale: e.g. it lists 360 → (8, 45) for factor −1
    /// and (12, 30) for 16, while the function returns (18, 20) and (15, 24).)
    static let lycorisTable: [(dimension: Int, expected: [(Int, Int)])] = [
        (1, [(1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]),
        (2, [(1, 2), (1, 2), (1, 2), (1, 2), (1, 2), (1, 2)]),
        (7, [(1, 7), (1, 7), (1, 7), (1, 7), (1, 7), (1, 7)]),
        (12, [(3, 4), (2, 6), (3, 4), (3, 4), (3, 4), (3, 4)]),
        (20, [(4, 5), (2, 10), (4, 5), (4, 5), (4, 5), (2, 10)]),
        (24, [(4, 6), (2, 12), (4, 6), (3, 8), (4, 6), (3, 8)]),
        (64, [(8, 8), (2, 32), (4, 16), (8, 8), (4, 16), (2, 32)]),
        (127, [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127), (1, 127)]),
        (128, [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16), (2, 64)]),
        (250, [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25), (2, 125)]),
        (320, [(16, 20), (2, 160), (4, 80), (8, 40), (16, 20), (2, 160)]),
        (360, [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24), (3, 120)]),
        (512, [(16, 32), (2, 256), (4, 128), (8, 64), (16, 32), (2, 256)]),
        (640, [(20, 32), (2, 320), (4, 160), (8, 80), (16, 40), (2, 320)]),
        (768, [(24, 32), (2, 384), (4, 192), (8, 96), (16, 48), (3, 256)]),
        (1024, [(32, 32), (2, 512), (4, 256), (8, 128), (16, 64), (2, 512)]),
        (1280, [(32, 40), (2, 640), (4, 320), (8, 160), (16, 80), (2, 640)]),
        (2048, [(32, 64), (2, 1024), (4, 512), (8, 256), (16, 128), (2, 1024)]),
    ]

    @Test(arguments: 0..<lycorisTable.count)
    func matchesLycoris(_ row: Int) {
        let (dimension, expected) = Self.lycorisTable[row]
        for (factor, want) in zip(Self.factors, expected) {
            let got = factorization(dimension, factor: factor)
            #expect(got.m == want.0 && got.n == want.1, "factorization(\(dimension), \(factor)) = \(got), LyCORIS \(want)")
        }
    }

    @Test func defaultFactorIsUnbounded() {
        for (dimension, expected) in Self.lycorisTable {
            let got = factorization(dimension)
            #expect(got.m == expected[0].0 && got.n == expected[0].1, "factorization(\(dimension))")
        }
    }

    /// Independent characterisation of the LyCORIS walk: with a factor that divides the
    /// dimension the split is (min(f, d/f), max(f, d/f)); otherwise (f < 0 meaning no
    /// bound) m is the largest divisor of d that is ≤ min(f, √d), and n = d/m.
    @Test(arguments: [-1, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32, 64])
    func divisorCharacterisation(factor: Int) {
        for dimension in 1...600 {
            let got = factorization(dimension, factor: factor)
            let expected: (Int, Int)
            if factor > 0 && dimension % factor == 0 {
                expected = (min(factor, dimension / factor), max(factor, dimension / factor))
            } else {
                let limit = factor < 0 ? dimension : factor
                let m = (1...dimension).filter { dimension % $0 == 0 && $0 * $0 <= dimension && $0 <= limit }.max() ?? 1
                expected = (m, dimension / m)
            }
            if got.m != expected.0 || got.n != expected.1 {
                Issue.record("factorization(\(dimension), \(factor)) = \(got), expected \(expected)")
            }
            #expect(got.m * got.n == dimension && got.m <= got.n)
        }
    }

    /// A zero factor neither divides nor means "unbounded": no divisor above 1 is allowed.
    @Test func zeroFactorKeepsTheTrivialSplit() {
        for dimension in [1, 12, 360, 1024] {
            let got = factorization(dimension, factor: 0)
            #expect(got.m == 1 && got.n == dimension)
        }
    }
}
