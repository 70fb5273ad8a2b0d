/// A dense, contiguous, row-major (C order) tensor of 32-bit floats: the compute type of
/// every adapter. Storage dtypes (F16, BF16, F64) are converted on the way in and out
/// (see ``DType``); all arithmetic happens in Float32.
///
/// Value semantics: copies share storage until one of them is written (copy-on-write
/// through `Array`).
public struct Tensor: Sendable, Equatable {
    /// Extent of every axis; `[]` is a 0-dim scalar holding one element.
    public private(set) var shape: [Int]
    /// The elements in row-major order; `scalars.count == shape.product`.
    public var scalars: [Float]

    public init(shape: [Int], scalars: [Float]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative extent in shape \(shape)")
        precondition(shape.product == scalars.count, "shape \(shape) does not hold \(scalars.count) scalars")
        self.shape = shape
        self.scalars = scalars
    }

    /// A tensor of the given shape filled with `value`.
    public init(repeating value: Float, shape: [Int]) {
        self.init(shape: shape, scalars: [Float](repeating: value, count: shape.product))
    }

    /// A tensor whose elements are not initialised: for outputs that are written in full
    /// before being read (GEMM results with β = 0).
    init(uninitializedShape shape: [Int]) {
        self.init(shape: shape, scalars: [Float](unsafeUninitializedCapacity: shape.product) { _, count in count = shape.product })
    }

    /// A tensor of zeros.
    public static func zeros(_ shape: [Int]) -> Tensor { Tensor(repeating: 0, shape: shape) }

    /// A 0-dim tensor holding `value`.
    public init(scalar value: Float) { self.init(shape: [], scalars: [value]) }

    public var count: Int { scalars.count }
    public var rank: Int { shape.count }

    /// The single element of a tensor with one element (any shape).
    public var scalarValue: Float {
        precondition(count == 1, "scalarValue of a tensor with shape \(shape)")
        return scalars[0]
    }

    /// The same elements viewed with another shape of equal element count. One extent may
    /// be `-1` and is inferred.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        var resolved = newShape
        if let hole = newShape.firstIndex(of: -1) {
            let known = newShape.enumerated().filter { $0.offset != hole }.map(\.element).product
            precondition(known > 0 && count % known == 0, "cannot reshape \(shape) to \(newShape)")
            resolved[hole] = count / known
        }
        return Tensor(shape: resolved, scalars: scalars)
    }

    /// Row-major strides of `shape`, in elements.
    public static func strides(of shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var running = 1
        for axis in shape.indices.reversed() {
            strides[axis] = running
            running *= shape[axis]
        }
        return strides
    }
}

extension Array where Element == Int {
    /// Product of the elements (1 for an empty array): the element count of a shape.
    public var product: Int { reduce(1, *) }
}

// MARK: - Elementwise arithmetic

extension Tensor {
    /// Applies `transform` to every element.
    public func map(_ transform: (Float) -> Float) -> Tensor {
        Tensor(shape: shape, scalars: scalars.map(transform))
    }

    /// Combines two tensors of identical shape element by element.
    public func zipMap(_ other: Tensor, _ combine: (Float, Float) -> Float) -> Tensor {
        precondition(shape == other.shape, "shape mismatch \(shape) vs \(other.shape)")
        var result = scalars
        other.scalars.withUnsafeBufferPointer { rhs in
            result.withUnsafeMutableBufferPointer { lhs in
                for i in lhs.indices { lhs[i] = combine(lhs[i], rhs[i]) }
            }
        }
        return Tensor(shape: shape, scalars: result)
    }

    public static func + (lhs: Tensor, rhs: Tensor) -> Tensor { lhs.zipMap(rhs, +) }
    public static func - (lhs: Tensor, rhs: Tensor) -> Tensor { lhs.zipMap(rhs, -) }
    /// Hadamard (elementwise) product.
    public static func * (lhs: Tensor, rhs: Tensor) -> Tensor { lhs.zipMap(rhs, *) }
    public static func * (lhs: Tensor, rhs: Float) -> Tensor { lhs.map { $0 * rhs } }
    public static func * (lhs: Float, rhs: Tensor) -> Tensor { rhs.map { $0 * lhs } }

    /// `self += alpha · other` in place.
    public mutating func add(_ other: Tensor, scaledBy alpha: Float = 1) {
        precondition(shape == other.shape, "shape mismatch \(shape) vs \(other.shape)")
        other.scalars.withUnsafeBufferPointer { rhs in
            scalars.withUnsafeMutableBufferPointer { lhs in
                for i in lhs.indices { lhs[i] += alpha * rhs[i] }
            }
        }
    }

    /// Σ elements, accumulated in Double.
    public var sum: Float { Float(scalars.reduce(0.0) { $0 + Double($1) }) }

    /// Σ self ⊙ other, accumulated in Double.
    public func dot(_ other: Tensor) -> Float {
        precondition(count == other.count, "dot of \(shape) and \(other.shape)")
        var total = 0.0
        for i in scalars.indices { total += Double(scalars[i]) * Double(other.scalars[i]) }
        return Float(total)
    }

    /// Frobenius norm ‖self‖₂, accumulated in Double.
    public var norm: Float { Float(scalars.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()) }

    /// max |x|, 0 for an empty tensor.
    public var maxAbs: Float { scalars.reduce(0) { Swift.max($0, abs($1)) } }

    /// True when every element is finite (no NaN, no ±∞).
    public var isFinite: Bool { scalars.allSatisfy(\.isFinite) }
}
