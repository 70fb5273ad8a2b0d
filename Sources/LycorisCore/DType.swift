/// The element types of a safetensors file, spelled as in its header (`"dtype": "F32"`).
///
/// Every multi-byte type is stored little-endian. The floating-point types decode to `Float`
/// with ``decodeFloats(_:as:)``; the integer and boolean types decode to `Float` as well
/// (see that function for the exact rules). Only `F64`, `F32`, `F16` and `BF16` can be
/// encoded from `Float` (``encodeFloats(_:as:)``).
public enum DType: String, Sendable, CaseIterable {
    /// IEEE 754 binary64.
    case f64 = "F64"
    /// IEEE 754 binary32.
    case f32 = "F32"
    /// IEEE 754 binary16 (half precision): 1 sign, 5 exponent (bias 15), 10 mantissa bits.
    case f16 = "F16"
    /// bfloat16: the upper 16 bits of a binary32 (1 sign, 8 exponent, 7 mantissa bits).
    case bf16 = "BF16"
    /// Two's-complement signed 64-bit integer.
    case i64 = "I64"
    /// Two's-complement signed 32-bit integer.
    case i32 = "I32"
    /// Two's-complement signed 16-bit integer.
    case i16 = "I16"
    /// Two's-complement signed 8-bit integer.
    case i8 = "I8"
    /// Unsigned 8-bit integer.
    case u8 = "U8"
    /// One byte per element; zero is `false`, anything else is `true`.
    case bool = "BOOL"
    /// 8-bit float, the "E4M3FN" variant (ml_dtypes `float8_e4m3fn`): 1 sign, 4 exponent (bias 7),
    /// 3 mantissa bits, subnormals, no infinities, NaN only for `0x7F` and `0xFF`; largest finite 448.
    case f8e4m3 = "F8_E4M3"
    /// 8-bit float, the IEEE-like "E5M2" variant (ml_dtypes `float8_e5m2`): 1 sign, 5 exponent (bias 15),
    /// 2 mantissa bits, subnormals, infinities (`0x7C`, `0xFC`) and NaNs; largest finite 57344.
    case f8e5m2 = "F8_E5M2"

    /// The number of bytes one element occupies.
    public var byteSize: Int {
        switch self {
        case .f64, .i64: return 8
        case .f32, .i32: return 4
        case .f16, .bf16, .i16: return 2
        case .i8, .u8, .bool, .f8e4m3, .f8e5m2: return 1
        }
    }

    /// Whether the type is a floating-point type (`F64`, `F32`, `F16`, `BF16`, `F8_E4M3`, `F8_E5M2`).
    public var isFloatingPoint: Bool {
        switch self {
        case .f64, .f32, .f16, .bf16, .f8e4m3, .f8e5m2: return true
        case .i64, .i32, .i16, .i8, .u8, .bool: return false
        }
    }

    /// Whether ``encodeFloats(_:as:)`` can write this type (`F64`, `F32`, `F16`, `BF16`).
    public var isEncodable: Bool {
        switch self {
        case .f64, .f32, .f16, .bf16: return true
        default: return false
        }
    }
}

extension DType: CustomStringConvertible {
    /// The header spelling, e.g. `F8_E4M3`.
    public var description: String { rawValue }
}

/// Thrown by ``encodeFloats(_:as:)`` for a type it cannot write.
public enum DTypeError: Error, Equatable, CustomStringConvertible {
    /// Only `F64`, `F32`, `F16` and `BF16` can be encoded from `Float`.
    case unsupportedEncoding(DType)
    /// A byte buffer's length is not a whole number of elements.
    case misalignedLength(byteCount: Int, dtype: DType)

    public var description: String {
        switch self {
        case .unsupportedEncoding(let dtype):
            return "cannot encode Float values as \(dtype.rawValue): only F64, F32, F16 and BF16 can be written from Float"
        case .misalignedLength(let count, let dtype):
            return "a buffer of \(count) bytes is not a whole number of \(dtype.rawValue) elements (\(dtype.byteSize) bytes each)"
        }
    }
}

// MARK: - Decoding

/// Decodes little-endian elements of `dtype` into `Float`s.
///
/// Rules:
/// - `F32`, `F16`, `BF16`, `F8_E4M3`, `F8_E5M2`: exact (every value of these types is a `Float`);
///   ±0, subnormals, ±inf are preserved; NaN stays NaN with its sign (F16 and BF16 NaN payloads are
///   kept, shifted into the top of the F32 mantissa, as numpy does; F8 NaNs become the quiet NaN
///   `0x7FC00000` with their sign, as ml_dtypes does).
/// - `F64`: rounded to the nearest `Float` (ties to even); out of range becomes ±inf; NaN stays NaN.
/// - `I64`, `I32`: rounded to the nearest `Float` (ties to even) when not exactly representable.
/// - `I16`, `I8`, `U8`: exact.
/// - `BOOL`: `0` → `0.0`, any other byte → `1.0`.
///
/// The buffer need not be aligned. A trailing partial element (when `bytes.count` is not a multiple
/// of `dtype.byteSize`) is ignored; callers that care should check the length first.
public func decodeFloats(_ bytes: UnsafeRawBufferPointer, as dtype: DType) -> [Float] {
    let count = bytes.count / dtype.byteSize
    guard count > 0, let base = bytes.baseAddress else { return [] }
    return [Float](unsafeUninitializedCapacity: count) { out, initialized in
        guard let destination = out.baseAddress else { return }
        decodeFloats(from: base, count: count, as: dtype, into: destination)
        initialized = count
    }
}

/// Decodes `count` little-endian elements of `dtype` at `source` (any alignment) into `destination`.
/// The same rules as ``decodeFloats(_:as:)``.
public func decodeFloats(from source: UnsafeRawPointer, count: Int, as dtype: DType,
                         into destination: UnsafeMutablePointer<Float>) {
    let src = UnsafeRawBufferPointer(start: source, count: count * dtype.byteSize)
    switch dtype {
    case .f32:
        #if _endian(little)
        UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 4)
        #else
        for i in 0..<count {
            destination[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))
        }
        #endif
    case .f64:
        for i in 0..<count {
            let bits = UInt64(littleEndian: src.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
            destination[i] = Float(Double(bitPattern: bits))
        }
    case .f16:
        for i in 0..<count {
            let bits = UInt16(littleEndian: src.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
            destination[i] = FloatConversion.float(fromFloat16Bits: bits)
        }
    case .bf16:
        for i in 0..<count {
            let bits = UInt16(littleEndian: src.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))
            destination[i] = Float(bitPattern: UInt32(bits) &<< 16)
        }
    case .f8e4m3:
        let bytes = source.assumingMemoryBound(to: UInt8.self)
        FloatConversion.f8e4m3Table.withUnsafeBufferPointer { table in
            for i in 0..<count { destination[i] = table[Int(bytes[i])] }
        }
    case .f8e5m2:
        let bytes = source.assumingMemoryBound(to: UInt8.self)
        FloatConversion.f8e5m2Table.withUnsafeBufferPointer { table in
            for i in 0..<count { destination[i] = table[Int(bytes[i])] }
        }
    case .i64:
        for i in 0..<count {
            destination[i] = Float(Int64(littleEndian: src.loadUnaligned(fromByteOffset: i * 8, as: Int64.self)))
        }
    case .i32:
        for i in 0..<count {
            destination[i] = Float(Int32(littleEndian: src.loadUnaligned(fromByteOffset: i * 4, as: Int32.self)))
        }
    case .i16:
        for i in 0..<count {
            destination[i] = Float(Int16(littleEndian: src.loadUnaligned(fromByteOffset: i * 2, as: Int16.self)))
        }
    case .i8:
        let bytes = source.assumingMemoryBound(to: Int8.self)
        for i in 0..<count { destination[i] = Float(bytes[i]) }
    case .u8:
        let bytes = source.assumingMemoryBound(to: UInt8.self)
        for i in 0..<count { destination[i] = Float(bytes[i]) }
    case .bool:
        let bytes = source.assumingMemoryBound(to: UInt8.self)
        for i in 0..<count { destination[i] = bytes[i] == 0 ? 0 : 1 }
    }
}

// MARK: - Encoding

/// Encodes `values` as little-endian elements of `dtype` (`F64`, `F32`, `F16` or `BF16`).
///
/// Rules:
/// - `F32`: bit-exact (NaN payloads included). `F64`: the exact same value (every `Float` is a
///   `Double`); NaN stays NaN with its sign and payload, made quiet.
/// - `F16`, `BF16`: rounded to nearest, ties to even; subnormal results are produced (and rounded)
///   correctly; magnitudes that round past the largest finite value become ±inf; ±inf stay ±inf;
///   -0.0 stays -0.0; NaN stays NaN with its sign, made quiet, keeping the top payload bits.
///
/// - Throws: ``DTypeError/unsupportedEncoding(_:)`` for any other type.
public func encodeFloats(_ values: [Float], as dtype: DType) throws -> [UInt8] {
    guard dtype.isEncodable else { throw DTypeError.unsupportedEncoding(dtype) }
    let byteCount = values.count * dtype.byteSize
    return [UInt8](unsafeUninitializedCapacity: byteCount) { out, initialized in
        values.withUnsafeBufferPointer { src in
            encodeFloatsUnchecked(src, as: dtype, into: UnsafeMutableRawPointer(out.baseAddress))
        }
        initialized = byteCount
    }
}

/// Encodes `values` as little-endian elements of `dtype` into `destination`, which must hold at least
/// `values.count * dtype.byteSize` bytes (any alignment). The same rules as ``encodeFloats(_:as:)``.
///
/// - Throws: ``DTypeError/unsupportedEncoding(_:)`` for a type other than `F64`, `F32`, `F16`, `BF16`.
public func encodeFloats(_ values: UnsafeBufferPointer<Float>, as dtype: DType,
                         into destination: UnsafeMutableRawBufferPointer) throws {
    guard dtype.isEncodable else { throw DTypeError.unsupportedEncoding(dtype) }
    precondition(destination.count >= values.count * dtype.byteSize,
                 "destination holds \(destination.count) bytes, \(values.count * dtype.byteSize) needed")
    encodeFloatsUnchecked(values, as: dtype, into: destination.baseAddress)
}

/// `dtype` must be encodable and `destination` large enough (it may be nil only when `values` is empty).
@inline(__always)
private func encodeFloatsUnchecked(_ values: UnsafeBufferPointer<Float>, as dtype: DType,
                                   into destination: UnsafeMutableRawPointer?) {
    guard let dst = destination, let src = values.baseAddress, values.count > 0 else { return }
    let count = values.count
    switch dtype {
    case .f32:
        #if _endian(little)
        dst.copyMemory(from: src, byteCount: count * 4)
        #else
        for i in 0..<count { dst.storeBytes(of: src[i].bitPattern.littleEndian, toByteOffset: i * 4, as: UInt32.self) }
        #endif
    case .f64:
        for i in 0..<count {
            dst.storeBytes(of: Double(src[i]).bitPattern.littleEndian, toByteOffset: i * 8, as: UInt64.self)
        }
    case .f16:
        for i in 0..<count {
            dst.storeBytes(of: FloatConversion.float16Bits(src[i]).littleEndian, toByteOffset: i * 2, as: UInt16.self)
        }
    case .bf16:
        for i in 0..<count {
            dst.storeBytes(of: FloatConversion.bfloat16Bits(src[i]).littleEndian, toByteOffset: i * 2, as: UInt16.self)
        }
    default:
        preconditionFailure("unreachable: \(dtype) is not encodable")
    }
}
