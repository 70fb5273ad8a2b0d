import Foundation
import LycorisCore
import LycorisRPC

/// Tensors on the wire. JSON carries only descriptors; the elements live in the arena or,
/// for small tensors and clients that cannot map memory, in base64:
///
///     {"dtype": "F32", "shape": [2, 320], "offset": 4096}     elements in the arena
///     {"dtype": "BF16", "shape": [2, 320], "data": "AAC…"}     elements inline, little-endian
///
/// Outputs go where the request says: `{"offset": N}` (with optional `"dtype"`) writes into
/// the arena at N and answers the full descriptor; no output spec answers base64 inline.
/// Dtypes are F32, F16 and BF16; compute is always F32.
struct TensorTransport {
    static let wireDTypes: [DType] = [.f32, .f16, .bf16]

    var arena: Arena?

    static func dtype(_ name: String, path: String) throws -> DType {
        guard let dtype = DType(rawValue: name), wireDTypes.contains(dtype) else {
            throw RPCError.dtypeMismatch("\(path) has dtype \"\(name)\"; tensors travel as F32, F16 or BF16", path: path)
        }
        return dtype
    }

    /// Reads a tensor descriptor; rejects NaN and ±∞ unless `allowNonFinite`.
    func read(_ value: JSONValue, path: String, allowNonFinite: Bool = false) throws -> (tensor: Tensor, dtype: DType) {
        let p = try Params(value, path: path)
        let dtype = try Self.dtype(try p.string("dtype"), path: p.at("dtype"))
        let shape = try p.ints("shape")
        switch (p.has("offset"), p.has("data")) {
        case (true, false):
            return (try readArena(offset: try p.int("offset"), dtype: dtype, shape: shape, path: path, shapePath: p.at("shape"),
                                  allowNonFinite: allowNonFinite), dtype)
        case (false, true):
            let count = try Self.elementCount(shape, path: p.at("shape"))
            guard let data = Data(base64Encoded: try p.string("data")) else {
                throw RPCError.invalidParams("\(p.at("data")) is not valid base64", path: p.at("data"))
            }
            let (needed, overflow) = count.multipliedReportingOverflow(by: dtype.byteSize)
            guard !overflow, data.count == needed else {
                throw RPCError.shapeMismatch("\(path) holds \(data.count) bytes; shape \(shape) of \(dtype.rawValue) needs \(overflow ? "more than Int.max" : String(needed))", path: path)
            }
            let tensor = Tensor(shape: shape, scalars: data.withUnsafeBytes { decodeFloats($0, as: dtype) })
            if !allowNonFinite {
                let bad = Self.nonFiniteCount(tensor.scalars)
                if bad > 0 { throw RPCError.nonFinite(path, count: bad) }
            }
            return (tensor, dtype)
        default:
            throw RPCError.invalidParams("\(path) needs exactly one of \"offset\" (arena) or \"data\" (base64)", path: path)
        }
    }

    /// The element count of `shape`, which must have no negative extent and a product that fits an Int.
    static func elementCount(_ shape: [Int], path: String) throws -> Int {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw RPCError.invalidParams("\(path) has a negative extent", path: path) }
        var count = 1
        for extent in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: extent)
            guard !overflow else { throw RPCError.invalidParams("\(path) is too large", path: path) }
            count = product
        }
        return count
    }

    /// Reads the tensor of `shape` and `dtype` at arena `offset` (the descriptor at `path`, its
    /// shape at `shapePath`); rejects NaN and ±∞ unless `allowNonFinite`.
    func readArena(offset: Int, dtype: DType, shape: [Int], path: String, shapePath: String,
                   allowNonFinite: Bool = false) throws -> Tensor {
        let count = try Self.elementCount(shape, path: shapePath)
        guard let arena else { throw RPCError.arena("\(path) refers to the arena, but none exists: call arena.create first", path: path) }
        let bytes = try arena.bytes(offset: offset, count: count, dtype: dtype, path: path)
        let scalars: [Float]
        let nonFinite: Int
        if dtype == .f32 {
            // One pass over the arena: copy and count non-finite values together.
            var bad = 0
            scalars = [Float](unsafeUninitializedCapacity: count) { out, initialized in
                bad = Self.copyCountingNonFinite(from: UnsafeRawPointer(bytes.baseAddress!), into: out.baseAddress!, count: count)
                initialized = count
            }
            nonFinite = bad
        } else {
            scalars = decodeFloats(UnsafeRawBufferPointer(bytes), as: dtype)
            nonFinite = allowNonFinite ? 0 : Self.nonFiniteCount(scalars)
        }
        if !allowNonFinite && nonFinite > 0 { throw RPCError.nonFinite(path, count: nonFinite) }
        return Tensor(shape: shape, scalars: scalars)
    }

    /// Elements that are NaN or ±∞ (all exponent bits set). Branch-free over the bit
    /// patterns so the loop vectorises: (bits & exponent) + 2²³ reaches 2³¹ exactly when
    /// every exponent bit is set. Counted in UInt32 lanes per chunk of 2²⁰ elements.
    static func nonFiniteCount(_ values: [Float]) -> Int {
        values.withUnsafeBufferPointer { floats in
            floats.withMemoryRebound(to: UInt32.self) { bits in
                var total = 0
                var start = 0
                while start < bits.count {
                    let end = min(bits.count, start + (1 << 20))
                    var count: UInt32 = 0
                    for i in start..<end { count &+= ((bits[i] & 0x7F80_0000) &+ 0x0080_0000) >> 31 }
                    total += Int(count)
                    start = end
                }
                return total
            }
        }
    }

    /// Copies `count` F32 values (any alignment) and counts the NaN/±∞ among them, in one
    /// vectorisable pass (the test of ``nonFiniteCount(_:)``).
    static func copyCountingNonFinite(from source: UnsafeRawPointer, into destination: UnsafeMutablePointer<Float>, count: Int) -> Int {
        let target = UnsafeMutableRawPointer(destination)
        var total = 0
        var start = 0
        while start < count {
            let end = min(count, start + (1 << 20))
            var bad: UInt32 = 0
            for i in start..<end {
                let bits = source.loadUnaligned(fromByteOffset: i &* 4, as: UInt32.self)
                target.storeBytes(of: bits, toByteOffset: i &* 4, as: UInt32.self)
                bad &+= ((bits & 0x7F80_0000) &+ 0x0080_0000) >> 31
            }
            total += Int(bad)
            start = end
        }
        return total
    }

    /// Where an output goes, from an optional output spec.
    enum Destination {
        case inline(DType)
        case arena(offset: Int, dtype: DType)
    }

    static func destination(_ value: JSONValue?, path: String, defaultDType: DType) throws -> Destination {
        guard let value, value != .null else { return .inline(defaultDType) }
        let p = try Params(value, path: path)
        let dtype = p.has("dtype") ? try Self.dtype(try p.string("dtype"), path: p.at("dtype")) : defaultDType
        guard p.has("offset") else { return .inline(dtype) }
        return .arena(offset: try p.int("offset"), dtype: dtype)
    }

    /// Checks, before anything is computed, that an output of `count` elements fits
    /// `destination` (an existing arena, in bounds, aligned).
    func validate(_ destination: Destination, count: Int, path: String) throws {
        guard case let .arena(offset, dtype) = destination else { return }
        guard let arena else { throw RPCError.arena("\(path) asks for the arena, but none exists: call arena.create first", path: path) }
        _ = try arena.bytes(offset: offset, count: count, dtype: dtype, path: path)
    }

    /// Writes `tensor` to `destination` and returns its descriptor.
    func write(_ tensor: Tensor, to destination: Destination, path: String) throws -> JSONValue {
        switch destination {
        case let .inline(dtype):
            let bytes = try encodeFloats(tensor.scalars, as: dtype)
            return ["dtype": .string(dtype.rawValue), "shape": JSONValue(tensor.shape), "data": .string(Data(bytes).base64EncodedString())]
        case let .arena(offset, dtype):
            guard let arena else { throw RPCError.arena("\(path) asks for the arena, but none exists: call arena.create first", path: path) }
            let target = try arena.bytes(offset: offset, count: tensor.count, dtype: dtype, path: path)
            try tensor.scalars.withUnsafeBufferPointer { try encodeFloats($0, as: dtype, into: target) }
            return ["dtype": .string(dtype.rawValue), "shape": JSONValue(tensor.shape), "offset": .integer(Int64(offset))]
        }
    }
}
