import LycorisCore
import LycorisTestSupport
import Testing

@Suite("DType and float conversions")
struct FloatConversionTests {
    @Test("byte sizes and raw values match the safetensors spelling")
    func dtypeBasics() {
        let sizes: [DType: Int] = [.f64: 8, .f32: 4, .f16: 2, .bf16: 2, .i64: 8, .i32: 4, .i16: 2,
                                   .i8: 1, .u8: 1, .bool: 1, .f8e4m3: 1, .f8e5m2: 1]
        for dtype in DType.allCases {
            #expect(dtype.byteSize == sizes[dtype])
            #expect(DType(rawValue: dtype.rawValue) == dtype)
        }
        #expect(DType.allCases.count == 12)
        #expect(DType.f8e4m3.rawValue == "F8_E4M3")
        #expect(DType.f8e5m2.rawValue == "F8_E5M2")
        #expect(DType.allCases.filter(\.isFloatingPoint) == [.f64, .f32, .f16, .bf16, .f8e4m3, .f8e5m2])
        #expect(DType.allCases.filter(\.isEncodable) == [.f64, .f32, .f16, .bf16])
        #expect(DType(rawValue: "f32") == nil)
    }

    // MARK: F16

    @Test("all 65536 F16 patterns decode exactly (checked against a derived formula)")
    func f16DecodeAll() {
        for bits in 0...UInt16.max {
            let value = FloatConversion.float(fromFloat16Bits: bits)
            let sign: Float = bits & 0x8000 != 0 ? -1 : 1
            let exponent = Int(bits >> 10) & 0x1F
            let mantissa = Int(bits & 0x3FF)
            if exponent == 31 {
                if mantissa == 0 {
                    #expect(value == sign * .infinity)
                } else {
                    // NaN: payload shifted into the top of the F32 mantissa, sign kept (as numpy does).
                    #expect(value.bitPattern == (UInt32(bits & 0x8000) << 16) | 0x7F80_0000 | (UInt32(mantissa) << 13))
                }
            } else {
                let magnitude = exponent == 0
                    ? Double(mantissa) * 0x1p-24
                    : (1 + Double(mantissa) / 1024) * Double(sign: .plus, exponent: exponent - 15, significand: 1)
                #expect(Double(value) == Double(sign) * magnitude, "bits 0x\(String(bits, radix: 16))")
                #expect(value.sign == (bits & 0x8000 != 0 ? .minus : .plus))
            }
        }
    }

    #if !(os(macOS) && arch(x86_64))
    @Test("F16 decoding agrees with Swift's Float16 for all 65536 patterns")
    func f16DecodeMatchesFloat16() {
        for bits in 0...UInt16.max {
            let mine = FloatConversion.float(fromFloat16Bits: bits)
            let swift = Float(Float16(bitPattern: bits))
            if swift.isNaN {
                #expect(mine.isNaN && mine.sign == swift.sign)
            } else {
                #expect(mine.bitPattern == swift.bitPattern)
            }
        }
    }

    @Test("F32 → F16 agrees with Swift's Float16 on 2 million sampled bit patterns")
    func f16EncodeMatchesFloat16() {
        var generator = SplitMix64(state: 0x5EED)
        for _ in 0..<2_000_000 {
            let raw = UInt32(truncatingIfNeeded: generator.next())
            // Bias towards the interesting exponent range of F16 half the time.
            let bits = raw & 1 == 0 ? raw : (raw & 0x807F_FFFF) | (UInt32(96 + (raw >> 23) % 48) << 23)
            let value = Float(bitPattern: bits)
            let mine = FloatConversion.float16Bits(value)
            let swift = Float16(value)
            if value.isNaN {
                #expect(mine & 0x7C00 == 0x7C00 && mine & 0x3FF != 0, "NaN stays NaN")
            } else if mine != swift.bitPattern {
                Issue.record("F16 of \(value) (0x\(String(bits, radix: 16))): 0x\(String(mine, radix: 16)) vs Float16 0x\(String(swift.bitPattern, radix: 16))")
                return
            }
        }
    }
    #endif

    @Test("all 65536 F16 patterns round-trip F16 → F32 → F16; NaNs stay (quiet) NaN")
    func f16RoundTrip() {
        for bits in 0...UInt16.max {
            let back = FloatConversion.float16Bits(FloatConversion.float(fromFloat16Bits: bits))
            let isNaN = bits & 0x7C00 == 0x7C00 && bits & 0x3FF != 0
            if isNaN {
                #expect(back & 0x7C00 == 0x7C00 && back & 0x200 != 0, "NaN 0x\(String(bits, radix: 16)) became 0x\(String(back, radix: 16))")
                #expect(back & 0x8000 == bits & 0x8000)
                #expect(back & 0x1FF == bits & 0x1FF, "payload kept")
            } else {
                #expect(back == bits, "0x\(String(bits, radix: 16)) came back as 0x\(String(back, radix: 16))")
            }
        }
    }

    @Test("F32 → F16: every halfway point between neighbours rounds to even, and one F32 ulp either side rounds to the nearer")
    func f16Ties() {
        for sign: UInt16 in [0, 0x8000] {
            for low in UInt16(0)..<0x7BFF {
                let high = low + 1
                let a = FloatConversion.float(fromFloat16Bits: low)
                let b = FloatConversion.float(fromFloat16Bits: high)
                let middle = Float((Double(a) + Double(b)) / 2)  // exact: needs 12 significant bits
                #expect(Double(middle) == (Double(a) + Double(b)) / 2)
                let even = low & 1 == 0 ? low : high
                let signed: (Float) -> Float = { sign == 0 ? $0 : -$0 }
                #expect(FloatConversion.float16Bits(signed(middle)) == sign | even)
                #expect(FloatConversion.float16Bits(signed(middle.nextUp)) == sign | high)
                #expect(FloatConversion.float16Bits(signed(middle.nextDown)) == sign | low)
            }
        }
        // The top: halfway between 65504 and 65536 (2^16, not representable) ties to inf.
        #expect(FloatConversion.float16Bits(65520) == 0x7C00)
        #expect(FloatConversion.float16Bits(-65520) == 0xFC00)
        #expect(FloatConversion.float16Bits(Float(65520).nextDown) == 0x7BFF)
        #expect(FloatConversion.float16Bits(65504) == 0x7BFF)
        #expect(FloatConversion.float16Bits(1e10) == 0x7C00)
        #expect(FloatConversion.float16Bits(.greatestFiniteMagnitude) == 0x7C00)
    }

    @Test("F32 → F16 specials: zeros, subnormals, infinities, NaN")
    func f16Specials() {
        #expect(FloatConversion.float16Bits(0) == 0x0000)
        #expect(FloatConversion.float16Bits(-0.0) == 0x8000)
        #expect(FloatConversion.float16Bits(.infinity) == 0x7C00)
        #expect(FloatConversion.float16Bits(-.infinity) == 0xFC00)
        #expect(FloatConversion.float16Bits(.nan) == 0x7E00)
        #expect(FloatConversion.float16Bits(-Float.nan) == 0xFE00)
        #expect(FloatConversion.float16Bits(Float(bitPattern: 0x7F80_0001)) & 0x7E00 == 0x7E00, "signalling NaN made quiet")
        #expect(FloatConversion.float16Bits(0x1p-24) == 0x0001)
        #expect(FloatConversion.float16Bits(0x1p-25) == 0x0000, "tie with zero → even (zero)")
        #expect(FloatConversion.float16Bits(Float(0x1p-25).nextUp) == 0x0001)
        #expect(FloatConversion.float16Bits(-0x1p-26) == 0x8000, "underflow keeps the sign")
        #expect(FloatConversion.float16Bits(0x1.8p-24) == 0x0002, "tie between 1 and 2 ulps → 2")
        #expect(FloatConversion.float16Bits(0x1.ff8p-15) == 0x03FF, "largest subnormal")
        #expect(FloatConversion.float16Bits(0x1.ffcp-15) == 0x0400, "largest subnormal + half ulp carries into the smallest normal")
        #expect(FloatConversion.float16Bits(0x1p-14) == 0x0400)
        #expect(FloatConversion.float16Bits(.leastNonzeroMagnitude) == 0x0000)
        #expect(FloatConversion.float16Bits(1) == 0x3C00)
        #expect(FloatConversion.float16Bits(-2) == 0xC000)
        #expect(FloatConversion.float16Bits(0.1) == 0x2E66)
        #expect(FloatConversion.float16Bits(1.0 / 3.0) == 0x3555)
    }

    // MARK: BF16

    @Test("all 65536 BF16 patterns round-trip BF16 → F32 → BF16; NaNs stay (quiet) NaN")
    func bf16RoundTrip() {
        for bits in 0...UInt16.max {
            let value = FloatConversion.float(fromBFloat16Bits: bits)
            #expect(value.bitPattern == UInt32(bits) << 16)
            let back = FloatConversion.bfloat16Bits(value)
            if value.isNaN {
                #expect(back & 0x7F80 == 0x7F80 && back & 0x40 != 0)
                #expect(back & 0x8000 == bits & 0x8000)
                #expect(back & 0x3F == bits & 0x3F)
            } else {
                #expect(back == bits, "0x\(String(bits, radix: 16)) came back as 0x\(String(back, radix: 16))")
            }
        }
    }

    @Test("F32 → BF16: every halfway point rounds to even (subnormals included), one ulp either side to the nearer")
    func bf16Ties() {
        for sign: UInt32 in [0, 0x8000_0000] {
            for low in UInt32(0)..<0x7F80 {
                let base = sign | (low << 16)
                let even = UInt16(truncatingIfNeeded: (low & 1 == 0 ? low : low + 1)) | UInt16(sign >> 16)
                #expect(FloatConversion.bfloat16Bits(Float(bitPattern: base | 0x8000)) == even)
                #expect(FloatConversion.bfloat16Bits(Float(bitPattern: base | 0x8001)) == UInt16(sign >> 16) | UInt16(low + 1))
                #expect(FloatConversion.bfloat16Bits(Float(bitPattern: base | 0x7FFF)) == UInt16(sign >> 16) | UInt16(low))
                #expect(FloatConversion.bfloat16Bits(Float(bitPattern: base)) == UInt16(sign >> 16) | UInt16(low))
            }
        }
        #expect(FloatConversion.bfloat16Bits(.greatestFiniteMagnitude) == 0x7F80, "rounds past the largest BF16 to inf")
        #expect(FloatConversion.bfloat16Bits(-.greatestFiniteMagnitude) == 0xFF80)
        #expect(FloatConversion.bfloat16Bits(Float(bitPattern: 0x7F7F_7FFF)) == 0x7F7F)
        #expect(FloatConversion.bfloat16Bits(-0.0) == 0x8000)
        #expect(FloatConversion.bfloat16Bits(.nan) == 0x7FC0)
        #expect(FloatConversion.bfloat16Bits(-Float.nan) == 0xFFC0)
        #expect(FloatConversion.bfloat16Bits(Float(bitPattern: 0x7F80_0001)).isBFloat16NaN, "low-payload NaN does not become inf")
        #expect(FloatConversion.bfloat16Bits(.leastNonzeroMagnitude) == 0x0000)
        #expect(FloatConversion.bfloat16Bits(1) == 0x3F80)
        #expect(FloatConversion.bfloat16Bits(0.1) == 0x3DCD)
    }

    @Test("F32 → BF16 agrees with a Double-arithmetic reference on 2 million sampled bit patterns")
    func bf16Sampled() {
        var generator = SplitMix64(state: 0xBF16)
        for _ in 0..<2_000_000 {
            let value = Float(bitPattern: UInt32(truncatingIfNeeded: generator.next()))
            guard !value.isNaN, value.isFinite else { continue }
            let truncated = UInt16(value.bitPattern >> 16)
            let down = Double(Float(bitPattern: UInt32(truncated) << 16))
            let upBits = truncated &+ 1
            let up = upBits & 0x7FFF == 0x7F80
                ? Double(value.sign == .minus ? -1 : 1) * 0x1p128
                : Double(Float(bitPattern: UInt32(upBits) << 16))
            let distanceDown = abs(Double(value) - down)
            let distanceUp = abs(up - Double(value))
            let expected = distanceDown < distanceUp ? truncated
                : distanceUp < distanceDown ? upBits
                : (truncated & 1 == 0 ? truncated : upBits)
            let mine = FloatConversion.bfloat16Bits(value)
            if mine != expected {
                Issue.record("BF16 of \(value): 0x\(String(mine, radix: 16)), expected 0x\(String(expected, radix: 16))")
                return
            }
        }
    }

    // MARK: F8

    @Test("all 256 F8_E4M3 (E4M3FN) patterns decode to the derived value")
    func f8e4m3All() {
        for bits in 0...UInt8.max {
            let value = FloatConversion.float(fromF8E4M3Bits: bits)
            let negative = bits & 0x80 != 0
            let exponent = Int(bits >> 3) & 0xF
            let mantissa = Double(bits & 7)
            if bits & 0x7F == 0x7F {
                #expect(value.isNaN && value.bitPattern == (negative ? 0xFFC0_0000 : 0x7FC0_0000))
                continue
            }
            let magnitude = exponent == 0 ? mantissa / 8 * 0x1p-6 : (1 + mantissa / 8) * Double(sign: .plus, exponent: exponent - 7, significand: 1)
            #expect(Double(value) == (negative ? -magnitude : magnitude))
            #expect(value.sign == (negative ? .minus : .plus))
        }
        #expect(FloatConversion.float(fromF8E4M3Bits: 0x7E) == 448, "largest finite")
        #expect(FloatConversion.float(fromF8E4M3Bits: 0x01) == 0x1p-9, "smallest subnormal")
        #expect(FloatConversion.float(fromF8E4M3Bits: 0x08) == 0x1p-6, "smallest normal")
        #expect(FloatConversion.float(fromF8E4M3Bits: 0x78) == 256, "exponent 15 is finite (no infinities)")
        #expect(FloatConversion.float(fromF8E4M3Bits: 0x80).bitPattern == 0x8000_0000, "-0")
    }

    @Test("all 256 F8_E5M2 patterns decode to the derived value")
    func f8e5m2All() {
        for bits in 0...UInt8.max {
            let value = FloatConversion.float(fromF8E5M2Bits: bits)
            let negative = bits & 0x80 != 0
            let exponent = Int(bits >> 2) & 0x1F
            let mantissa = Double(bits & 3)
            if exponent == 31 {
                if mantissa == 0 {
                    #expect(value == (negative ? -.infinity : .infinity))
                } else {
                    #expect(value.isNaN && value.bitPattern == (negative ? 0xFFC0_0000 : 0x7FC0_0000))
                }
                continue
            }
            let magnitude = exponent == 0 ? mantissa / 4 * 0x1p-14 : (1 + mantissa / 4) * Double(sign: .plus, exponent: exponent - 15, significand: 1)
            #expect(Double(value) == (negative ? -magnitude : magnitude))
            #expect(value.sign == (negative ? .minus : .plus))
        }
        #expect(FloatConversion.float(fromF8E5M2Bits: 0x7B) == 57344, "largest finite")
        #expect(FloatConversion.float(fromF8E5M2Bits: 0x01) == 0x1p-16, "smallest subnormal")
        #expect(FloatConversion.float(fromF8E5M2Bits: 0xFC) == -.infinity)
    }

    // MARK: Buffers

    @Test("decodeFloats reads unaligned little-endian buffers of every dtype")
    func decodeUnaligned() {
        let cases: [(DType, [UInt8], [Float])] = [
            (.f32, [0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x80, 0xFF], [1.5, -.infinity]),
            (.f64, [0x9A, 0x99, 0x99, 0x99, 0x99, 0x99, 0xB9, 0x3F], [0.1]),
            (.f16, [0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00], [1, -2, 0x1p-24]),
            (.bf16, [0x80, 0x3F, 0xC0, 0x7F], [1, .nan]),
            (.f8e4m3, [0x38, 0x7E, 0xB8], [1, 448, -1]),
            (.f8e5m2, [0x3C, 0x7C, 0x7B], [1, .infinity, 57344]),
            (.i64, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
             [-1, 16_777_216]),  // 2^24 + 1 rounds to even 2^24
            (.i32, [0xFE, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x80], [-2, -2_147_483_648]),
            (.i16, [0x00, 0x80, 0xFF, 0x7F], [-32768, 32767]),
            (.i8, [0x80, 0x7F, 0xFF], [-128, 127, -1]),
            (.u8, [0x00, 0xFF], [0, 255]),
            (.bool, [0x00, 0x01, 0x02], [0, 1, 1]),
        ]
        for (dtype, bytes, expected) in cases {
            // Put the data at an odd address.
            let padded = [0xAB] + bytes + [0xCD]
            let decoded = padded.withUnsafeBytes { raw in
                decodeFloats(UnsafeRawBufferPointer(rebasing: raw[1..<(1 + bytes.count)]), as: dtype)
            }
            #expect(decoded.count == expected.count, "\(dtype)")
            for (got, want) in zip(decoded, expected) {
                #expect(got == want || (got.isNaN && want.isNaN), "\(dtype): \(got) vs \(want)")
            }
        }
        #expect([UInt8]().withUnsafeBytes { decodeFloats($0, as: .f32) } == [])
        #expect([UInt8](repeating: 0, count: 7).withUnsafeBytes { decodeFloats($0, as: .f32) }.count == 1,
                "a trailing partial element is ignored")
    }

    @Test("encodeFloats writes little-endian F64/F32/F16/BF16 and refuses other types")
    func encode() throws {
        let values: [Float] = [1, -0.0, .infinity, 0x1p-24, 65520]
        #expect(try encodeFloats(values, as: .f16) == [0x00, 0x3C, 0x00, 0x80, 0x00, 0x7C, 0x01, 0x00, 0x00, 0x7C])
        #expect(try encodeFloats(values, as: .bf16) == [0x80, 0x3F, 0x00, 0x80, 0x80, 0x7F, 0x80, 0x33, 0x80, 0x47])
        #expect(try encodeFloats([1.5], as: .f32) == [0x00, 0x00, 0xC0, 0x3F])
        #expect(try encodeFloats([1.5], as: .f64) == [0, 0, 0, 0, 0, 0, 0xF8, 0x3F])
        #expect(try encodeFloats([], as: .f16) == [])
        for dtype in DType.allCases where !dtype.isEncodable {
            #expect(throws: DTypeError.unsupportedEncoding(dtype)) { try encodeFloats([1], as: dtype) }
        }
        // Decoding what was encoded gives the rounded values back.
        for dtype in [DType.f64, .f32, .f16, .bf16] {
            let sample: [Float] = [0, -0.0, 1, -1, 0.5, 3.140625, .infinity, -.infinity]
            let bytes = try encodeFloats(sample, as: dtype)
            #expect(bytes.count == sample.count * dtype.byteSize)
            let back = bytes.withUnsafeBytes { decodeFloats($0, as: dtype) }
            #expect(back.map(\.bitPattern) == sample.map(\.bitPattern), "\(dtype)")
        }
    }
}

extension UInt16 {
    fileprivate var isBFloat16NaN: Bool { self & 0x7F80 == 0x7F80 && self & 0x7F != 0 }
}
