import LycorisCore

/// The sparse part of LyCORIS's "low rank + sparse" extraction (`extract_diff` with
/// `use_sparse_bias`, `lycoris extract --sparse-bias`): the largest entries of the residual
/// R = ΔW − up·down, stored beside a LoRA/LoCon module's factors in COO form:
///
/// - `bias_indices` (I16, (2, nnz)): row i_k and column j_k of each entry in the flattened
///   (out, in·k…) matrix (int16, so an index ≥ 2^15 wraps negative; read back modulo 2^16);
/// - `bias_values` (nnz): the entries v_k;
/// - `bias_size` (I16, (2,)): [out, in·k…].
///
/// The module's change is then ΔW = s·(up·down + S) with S[i_k, j_k] = v_k (zero elsewhere)
/// reshaped to W's shape and s = alpha/r: the rebuild of the LyCORIS author's A1111
/// extension, which adds the sparse matrix to up·down before scaling. LyCORIS 4.1.3's own
/// loader (and A1111's and ComfyUI's built-in ones) drop these keys, so a merge that
/// follows them loses the residual the file was written to carry.
public struct SparseBias: Sendable {
    /// The key suffixes, all three present or none.
    public static let suffixes = ["bias_indices", "bias_values", "bias_size"]
    /// [out, in·k…].
    public let size: [Int]
    /// Row-major positions i·size[1] + j, and the values there.
    public let positions: [Int]
    public let values: [Float]

    /// The module's sparse bias, or nil when it has none.
    /// - Throws: ``AdapterError`` naming the problem when only some keys are present, the
    ///   shapes disagree or an index is outside `bias_size`.
    public init?(_ tensors: [String: Tensor]) throws {
        let present = Self.suffixes.filter { tensors[$0] != nil }
        if present.isEmpty { return nil }
        guard let indices = tensors["bias_indices"], let values = tensors["bias_values"], let size = tensors["bias_size"] else {
            throw AdapterError("a sparse bias needs \(Self.suffixes.joined(separator: ", ")); the file has only \(present.joined(separator: ", "))")
        }
        let count = values.count
        guard indices.shape == [2, count], values.rank == 1, size.count == 2 else {
            throw AdapterError("sparse bias shapes: bias_indices \(indices.shape), bias_values \(values.shape), bias_size \(size.shape); "
                               + "expected (2, nnz), (nnz) and (2)")
        }
        func unwrapped(_ value: Float) -> Int { let index = Int(value); return index < 0 ? index + 65536 : index }
        self.size = size.scalars.map(unwrapped)
        var positions: [Int] = []
        positions.reserveCapacity(count)
        for k in 0..<count {
            let (row, column) = (unwrapped(indices.scalars[k]), unwrapped(indices.scalars[count + k]))
            guard row < self.size[0], column < self.size[1] else {
                throw AdapterError("sparse bias entry \(k) at (\(row), \(column)) is outside bias_size \(self.size)")
            }
            positions.append(row * self.size[1] + column)
        }
        self.positions = positions
        self.values = values.scalars
    }

    /// S as a dense tensor of `shape` (the layer's weight shape, whose element count must be
    /// out·in·k…).
    /// - Throws: ``AdapterError`` when `shape` does not hold bias_size's elements.
    public func dense(shape: [Int]) throws -> Tensor {
        guard shape.first == size[0], shape.product == size[0] * size[1] else {
            throw AdapterError("sparse bias of size \(size) does not fit a weight of shape \(shape)")
        }
        var result = Tensor.zeros(shape)
        for (position, value) in zip(positions, values) { result.scalars[position] += value }
        return result
    }
}
