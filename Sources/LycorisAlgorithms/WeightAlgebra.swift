import LycorisCore

/// The operations the algorithms' weight-path math (ΔW and its backward) is written in, so
/// one generic function per algorithm serves both engines: ``TensorAlgebra`` on host
/// ``Tensor``s, and LycorisDevice's algebra on device memory (cuBLAS GEMMs and the kernels of
/// Sources/LycorisCUDA/Kernels, or their CPU emulation).
///
/// Values are float32, row-major and contiguous. Every operation returns a new value (on a
/// device, a workspace buffer that lives until the calling method returns) except
/// ``reshaped(_:_:)`` and ``rows(_:_:)``, which are views of the same storage.
/// Operations do not throw: a device algebra remembers its first failure, turns the later
/// operations into no-ops and its caller throws that failure at the end (CUDA's own
/// sticky-error model), so the host's generic calls need no `try`.
package protocol WeightAlgebra {
    associatedtype Value

    func shape(of value: Value) -> [Int]
    /// The same elements with another shape of the same count (no copy).
    func reshaped(_ value: Value, _ shape: [Int]) -> Value
    /// α · op(A) · op(B) of matrices: op(A) (m, k), op(B) (k, n) → (m, n).
    func matmul(_ a: Value, transposeA: Bool, _ b: Value, transposeB: Bool, alpha: Float) -> Value
    /// in (outer, rows, columns, inner…) → (outer, columns, rows, inner…) with `shape` the four
    /// extents: a batch of transposes of blocks of `inner` elements.
    func swappingMiddleAxes(_ value: Value, _ shape: [Int]) -> Value
    /// s · x.
    func scaled(_ value: Value, by s: Float) -> Value
    /// s · (a ⊙ b), a and b of one shape.
    func hadamard(_ a: Value, _ b: Value, scale s: Float) -> Value
    /// a + b, of one shape (b's shape is the result's).
    func adding(_ a: Value, _ b: Value) -> Value
    /// s · kron(A, B): A (p, q), B (r, t, k…) → (p·r, q·t, k…) (``Tensor/kronecker(_:_:)``).
    func kronecker(_ a: Value, _ b: Value, scale s: Float) -> Value
    /// (∂A, ∂B) of s · kron(A, B) given its gradient (``Tensor/kroneckerBackward(_:_:_:)``, times s).
    func kroneckerBackward(_ gradient: Value, _ a: Value, _ b: Value, scale s: Float) -> (a: Value, b: Value)
    /// s · Σ a ⊙ b as a shape-[] value (use_scalar's ∂σ).
    func dot(_ a: Value, _ b: Value, scale s: Float) -> Value
    /// The single element of a one-element value (use_scalar's σ; a device waits for it).
    func scalar(_ value: Value) -> Float
    /// Rows `range` of a tensor's leading axis (a view).
    func rows(_ value: Value, _ range: Range<Int>) -> Value
    /// Columns `range` of a matrix, copied.
    func columns(_ value: Value, _ range: Range<Int>) -> Value
    /// A (rows, width) matrix of zeros with `block` (rows, range.count) in columns `range`.
    func placing(_ block: Value, columns range: Range<Int>, width: Int) -> Value
}

/// The host engine's ``WeightAlgebra``: ``Tensor`` operations (OpenBLAS GEMMs), never throwing.
package struct TensorAlgebra: WeightAlgebra {
    package init() {}

    package func shape(of value: Tensor) -> [Int] { value.shape }

    package func reshaped(_ value: Tensor, _ shape: [Int]) -> Tensor { value.reshaped(shape) }

    package func matmul(_ a: Tensor, transposeA: Bool, _ b: Tensor, transposeB: Bool, alpha: Float) -> Tensor {
        Tensor.matmul(a, transposeA: transposeA, b, transposeB: transposeB, alpha: alpha)
    }

    package func swappingMiddleAxes(_ value: Tensor, _ shape: [Int]) -> Tensor {
        value.reshaped(shape).permuted([0, 2, 1, 3])
    }

    package func scaled(_ value: Tensor, by s: Float) -> Tensor { s == 1 ? value : value * s }

    /// One pass: a[i]·b[i]·s.
    package func hadamard(_ a: Tensor, _ b: Tensor, scale s: Float) -> Tensor {
        s == 1 ? a * b : a.zipMap(b) { $0 * $1 * s }
    }

    package func adding(_ a: Tensor, _ b: Tensor) -> Tensor { a.reshaped(b.shape) + b }

    package func kronecker(_ a: Tensor, _ b: Tensor, scale s: Float) -> Tensor { scaled(Tensor.kronecker(a, b), by: s) }

    package func kroneckerBackward(_ gradient: Tensor, _ a: Tensor, _ b: Tensor, scale s: Float) -> (a: Tensor, b: Tensor) {
        Tensor.kroneckerBackward(scaled(gradient, by: s), a, b)
    }

    package func dot(_ a: Tensor, _ b: Tensor, scale s: Float) -> Tensor { Tensor(scalar: s * a.dot(b)) }

    package func scalar(_ value: Tensor) -> Float { value.scalarValue }

    package func rows(_ value: Tensor, _ range: Range<Int>) -> Tensor { value.slice(axis: 0, range) }

    package func columns(_ value: Tensor, _ range: Range<Int>) -> Tensor { value.slice(axis: 1, range) }

    package func placing(_ block: Tensor, columns range: Range<Int>, width: Int) -> Tensor {
        let rows = block.shape[0]
        var out = Tensor.zeros([rows, width])
        for row in 0..<rows {
            for (j, column) in range.enumerated() { out.scalars[row * width + column] = block.scalars[row * range.count + j] }
        }
        return out
    }
}

/// An adapter's tensors by saved key suffix (`lora_up.weight`, `hada_w1_a`, …) in one algebra's
/// values: the host module's ``ParameterSet``, or the device buffers a client hands over.
package struct Factors<Value> {
    package var values: [String: Value]

    package init(_ values: [String: Value]) { self.values = values }

    package subscript(name: String) -> Value? { values[name] }

    /// The tensor `name`; callers check presence first (``ParameterSet/required(_:)``'s contract).
    package func required(_ name: String) -> Value {
        guard let value = values[name] else { preconditionFailure("no parameter \(name)") }
        return value
    }

    /// σ of use_scalar (1 without one).
    package func scalar<A: WeightAlgebra>(_ algebra: A) -> Float where A.Value == Value {
        values["scalar"].map { algebra.scalar($0) } ?? 1
    }
}

extension WeightAlgebra {
    /// A tensor viewed as a matrix: its first axis rows, the rest columns.
    package func matrix(_ value: Value) -> Value {
        let shape = shape(of: value)
        return reshaped(value, [shape[0], shape.dropFirst().reduce(1, *)])
    }

    /// The transpose of a matrix, copied.
    package func transposed(_ value: Value) -> Value {
        let shape = shape(of: value)
        return reshaped(swappingMiddleAxes(value, [1, shape[0], shape[1], 1]), [shape[1], shape[0]])
    }

    package func matmul(_ a: Value, transposeA: Bool = false, _ b: Value, transposeB: Bool = false) -> Value {
        matmul(a, transposeA: transposeA, b, transposeB: transposeB, alpha: 1)
    }
}

extension Factors where Value == Tensor {
    package init(_ parameters: ParameterSet) {
        self.init(Dictionary(uniqueKeysWithValues: parameters.entries.map { ($0.name, $0.tensor) }))
    }
}
