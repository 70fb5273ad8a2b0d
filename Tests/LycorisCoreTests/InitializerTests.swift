import LycorisCore
import Testing

/// torch.nn.init semantics: fan-in, kaiming_uniform_(a) and normal_(0, std). Statistical
/// checks use 5 standard errors with fixed seeds.
@Suite struct InitializerTests {
    @Test(arguments: [
        ([64, 32], 32),
        ([320, 4, 3, 3], 36),
        ([8, 3, 3, 2], 18),
        ([16, 1, 5, 5], 25),
        ([10], 10),
        ([7, 1], 1),
        ([2, 3, 4, 5, 6], 360),
    ] as [([Int], Int)])
    func fanIn(shape: [Int], expected: Int) {
        #expect(Tensor.fanIn(of: shape) == expected)
    }

    /// Summary statistics of a sample, in Double.
    private struct Moments {
        var mean = 0.0, variance = 0.0, maxAbs = 0.0
        init(_ values: [Float]) {
            let n = Double(values.count)
            var sum = 0.0, squares = 0.0
            for v in values {
                let x = Double(v)
                sum += x; squares += x * x
                maxAbs = max(maxAbs, abs(x))
            }
            mean = sum / n
            variance = squares / n - mean * mean
        }
    }

    /// LyCORIS's a = √5: gain √(2/6), bound √(1/3)·√(3/fan_in) = 1/√fan_in.
    @Test(arguments: [([256, 64, 3, 3], 576), ([512, 300], 300), ([150_000], 150_000)] as [([Int], Int)])
    func kaimingUniformWithSqrt5HasBoundOneOverSqrtFanIn(shape: [Int], fanIn: Int) {
        var random = RandomSource(seed: 8)
        let t = Tensor.kaimingUniform(shape, using: &random)
        #expect(t.shape == shape)
        let bound = 1 / Double(fanIn).squareRoot()
        let n = Double(t.count)
        let m = Moments(t.scalars)
        // The bound is computed in Float (√(2/(1+a²))·√(3/fan)): allow its rounding, a few ulps.
        let slack = 4 * Double(Float.ulpOfOne) * bound
        #expect(m.maxAbs <= bound + slack, "max |x| \(m.maxAbs) > bound \(bound)")
        #expect(m.maxAbs > 0.95 * bound, "max |x| \(m.maxAbs) ≤ 0.95 · \(bound)")
        // U(−b, b): mean 0 with SE b/√(3n); variance b²/3 with SE √(4/45)·b²/√n.
        #expect(abs(m.mean) <= 5 * bound / (3 * n).squareRoot(), "mean \(m.mean)")
        let expectedVariance = bound * bound / 3
        #expect(abs(m.variance - expectedVariance) <= 5 * (4.0 / 45).squareRoot() * bound * bound / n.squareRoot(),
                "variance \(m.variance) vs \(expectedVariance)")
    }

    /// Other slopes: a = 0 gives He-uniform b = √(6/fan_in); a = 1 gives b = √(3/fan_in).
    @Test(arguments: [(0, 6.0), (1, 3.0)] as [(Float, Double)])
    func kaimingUniformGain(a: Float, numerator: Double) {
        var random = RandomSource(seed: 9)
        let shape = [400, 50, 2, 2]
        let t = Tensor.kaimingUniform(shape, a: a, using: &random)
        let bound = (numerator / 200).squareRoot()
        let m = Moments(t.scalars)
        let slack = 4 * Double(Float.ulpOfOne) * bound
        #expect(m.maxAbs <= bound + slack)
        #expect(m.maxAbs > 0.95 * bound)
        let n = Double(t.count)
        #expect(abs(m.variance - bound * bound / 3) <= 5 * (4.0 / 45).squareRoot() * bound * bound / n.squareRoot())
    }

    @Test func kaimingUniformIsReproducible() {
        var first = RandomSource(seed: 10), second = RandomSource(seed: 10), other = RandomSource(seed: 11)
        let a = Tensor.kaimingUniform([32, 16], using: &first)
        let b = Tensor.kaimingUniform([32, 16], using: &second)
        let c = Tensor.kaimingUniform([32, 16], using: &other)
        #expect(a == b)
        #expect(a != c)
    }

    @Test(arguments: [1, 0.02, 0.5, 3] as [Float])
    func normalHasRequestedStd(std: Float) {
        var random = RandomSource(seed: 12)
        let t = Tensor.normal([400, 500], std: std, using: &random)
        #expect(t.shape == [400, 500])
        let m = Moments(t.scalars)
        let n = Double(t.count), s = Double(std)
        // N(0, s²): SE(mean) = s/√n, SE(std) ≈ s/√(2n).
        #expect(abs(m.mean) <= 5 * s / n.squareRoot(), "mean \(m.mean)")
        #expect(abs(m.variance.squareRoot() - s) <= 5 * s / (2 * n).squareRoot(), "std \(m.variance.squareRoot()) vs \(s)")
    }

    @Test func normalWithZeroStdIsZero() {
        var random = RandomSource(seed: 13)
        let t = Tensor.normal([3, 4], std: 0, using: &random)
        #expect(t == .zeros([3, 4]))
    }
}
