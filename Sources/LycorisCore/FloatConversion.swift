/// Exact scalar conversions between `Float` and the narrow floating-point formats, done on bit
/// patterns (no dependence on the platform's `Float16` support or rounding mode).
///
/// Narrowing (`Float` → F16/BF16) rounds to nearest, ties to even, like IEEE 754 conversion and
/// numpy's `astype`; widening (F16/BF16/F8 → `Float`) is exact.
public enum FloatConversion {
    // MARK: F16

    /// The `Float` whose value is the IEEE binary16 `bits` (exact). NaN payloads are kept
    /// (shifted into the top of the binary32 mantissa) and their sign too.
    @inlinable
    public static func float(fromFloat16Bits bits: UInt16) -> Float {
        let sign = UInt32(bits & 0x8000) &<< 16
        let exponent = UInt32(bits &>> 10) & 0x1F
        let mantissa = UInt32(bits & 0x3FF)
        if exponent == 0x1F {  // ±inf, NaN
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa &<< 13))
        }
        if exponent != 0 {  // normal: rebias 15 → 127
            return Float(bitPattern: sign | ((exponent &+ 112) &<< 23) | (mantissa &<< 13))
        }
        // ±0 and subnormals: mantissa × 2⁻²⁴, exact in binary32.
        let magnitude = Float(mantissa) * 0x1p-24
        return sign == 0 ? magnitude : -magnitude
    }

    /// The IEEE binary16 bit pattern nearest to `value`, ties to even.
    ///
    /// Subnormal results are rounded correctly (the smallest, 2⁻²⁴, is reached from anything above
    /// 2⁻²⁵; exactly 2⁻²⁵ ties to zero); magnitudes ≥ 65520 become ±inf; -0.0 stays -0.0;
    /// NaN stays NaN with its sign, made quiet, keeping the top 9 payload bits.
    @inlinable
    public static func float16Bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits &>> 16) & 0x8000)
        let magnitude = bits & 0x7FFF_FFFF
        if magnitude >= 0x7F80_0000 {
            if magnitude == 0x7F80_0000 { return sign | 0x7C00 }  // ±inf
            return sign | 0x7E00 | UInt16(truncatingIfNeeded: (magnitude &>> 13) & 0x3FF)  // quiet NaN
        }
        if magnitude >= 0x477F_F000 {  // ≥ 65520, halfway between 65504 and 2¹⁶: rounds to inf
            return sign | 0x7C00
        }
        if magnitude >= 0x3880_0000 {  // ≥ 2⁻¹⁴: normal binary16
            // Rebias the exponent (127 → 15) and drop 13 mantissa bits, rounding to nearest even.
            // A carry out of the mantissa correctly bumps the exponent.
            let rebased = magnitude &- (112 &<< 23)
            let truncated = rebased &>> 13
            let remainder = rebased & 0x1FFF
            let roundUp: UInt32 = (remainder > 0x1000 || (remainder == 0x1000 && truncated & 1 == 1)) ? 1 : 0
            return sign | UInt16(truncatingIfNeeded: truncated &+ roundUp)
        }
        if magnitude <= 0x3300_0000 {  // ≤ 2⁻²⁵ (half the smallest subnormal): ties to even zero
            return sign
        }
        // Subnormal binary16: m × 2⁻²⁴. The binary32 here is normal (≥ 2⁻²⁵), value = M × 2^(E−150)
        // with M the 24-bit significand, so m = M × 2^(E−126) = M >> (126 − E), shift in 14...24.
        let biasedExponent = magnitude &>> 23
        let significand = (magnitude & 0x7F_FFFF) | 0x80_0000
        let shift = 126 &- biasedExponent
        let truncated = significand &>> shift
        let remainder = significand & ((1 &<< shift) &- 1)
        let half: UInt32 = 1 &<< (shift &- 1)
        let roundUp: UInt32 = (remainder > half || (remainder == half && truncated & 1 == 1)) ? 1 : 0
        // 0x3FF + 1 = 0x400 is exactly the smallest normal, so the carry needs no special case.
        return sign | UInt16(truncatingIfNeeded: truncated &+ roundUp)
    }

    // MARK: BF16

    /// The `Float` whose value is the bfloat16 `bits` (exact, NaN payloads included).
    @inlinable
    public static func float(fromBFloat16Bits bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) &<< 16)
    }

    /// The bfloat16 bit pattern nearest to `value`, ties to even.
    ///
    /// Subnormals round like normals (bfloat16 shares binary32's exponent range); magnitudes that
    /// round past 0x7F7F (≈3.3895e38) become ±inf; -0.0 stays -0.0; NaN stays NaN with its sign,
    /// made quiet, keeping the top 6 payload bits.
    @inlinable
    public static func bfloat16Bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if bits & 0x7FFF_FFFF > 0x7F80_0000 {  // NaN: truncate and set the quiet bit
            return UInt16(truncatingIfNeeded: bits &>> 16) | 0x0040
        }
        // Adding 0x7FFF (+1 when the kept part is odd) then truncating is round-to-nearest-even;
        // the carry propagates into the exponent, up to 0x7F80 (inf) for the largest magnitudes.
        let rounding: UInt32 = 0x7FFF &+ ((bits &>> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ rounding) &>> 16)
    }

    // MARK: F8

    /// The `Float` whose value is the float8 E4M3FN `bits` (exact): bias 7, subnormals
    /// m × 2⁻⁹, no infinities, `0x7F`/`0xFF` are NaN (returned as quiet NaN with that sign).
    public static func float(fromF8E4M3Bits bits: UInt8) -> Float {
        let negative = bits & 0x80 != 0
        let exponent = Int((bits &>> 3) & 0x0F)
        let mantissa = Int(bits & 0x07)
        let magnitude: Float
        if exponent == 15 && mantissa == 7 {
            return Float(bitPattern: (negative ? 0x8000_0000 : 0) | 0x7FC0_0000)
        } else if exponent == 0 {
            magnitude = Float(sign: .plus, exponent: -9, significand: Float(mantissa))
        } else {
            magnitude = Float(sign: .plus, exponent: exponent - 10, significand: Float(8 + mantissa))
        }
        return negative ? -magnitude : magnitude
    }

    /// The `Float` whose value is the float8 E5M2 `bits` (exact): IEEE-like, bias 15, subnormals
    /// m × 2⁻¹⁶, `0x7C`/`0xFC` are ±inf, exponent 31 with a nonzero mantissa is NaN (returned as
    /// quiet NaN with that sign).
    public static func float(fromF8E5M2Bits bits: UInt8) -> Float {
        let negative = bits & 0x80 != 0
        let exponent = Int((bits &>> 2) & 0x1F)
        let mantissa = Int(bits & 0x03)
        let magnitude: Float
        if exponent == 31 {
            if mantissa != 0 { return Float(bitPattern: (negative ? 0x8000_0000 : 0) | 0x7FC0_0000) }
            magnitude = .infinity
        } else if exponent == 0 {
            magnitude = Float(sign: .plus, exponent: -16, significand: Float(mantissa))
        } else {
            magnitude = Float(sign: .plus, exponent: exponent - 17, significand: Float(4 + mantissa))
        }
        return negative ? -magnitude : magnitude
    }

    /// All 256 E4M3FN values, indexed by bit pattern.
    static let f8e4m3Table: [Float] = (0...255).map { float(fromF8E4M3Bits: UInt8($0)) }
    /// All 256 E5M2 values, indexed by bit pattern.
    static let f8e5m2Table: [Float] = (0...255).map { float(fromF8E5M2Bits: UInt8($0)) }
}
