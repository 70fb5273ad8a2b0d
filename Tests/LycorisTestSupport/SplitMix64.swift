/// SplitMix64: a tiny deterministic generator for test inputs, independent of the library's
/// own `RandomSource`, so sampled tests are reproducible.
public struct SplitMix64: RandomNumberGenerator {
    public var state: UInt64

    public init(state: UInt64) { self.state = state }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) on a 2⁻²³ grid.
    public mutating func signedUnit() -> Float { Float(next() >> 40) * 0x1p-23 - 1 }

    /// A small integer in -8...8 (products and sums of these are exact in Float).
    public mutating func smallInteger() -> Float { Float(Int(next() % 17) - 8) }
}
