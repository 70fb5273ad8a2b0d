/// Axis permutation, transposition and concatenation: copies into a new contiguous tensor.
extension Tensor {
    /// `result[i₀…iₙ] = self[i at axes]`: result axis `k` is source axis `axes[k]`
    /// (NumPy `transpose(axes)` semantics).
    ///
    /// When the last axis stays last, its rows are copied whole (one run per outer index).
    public func permuted(_ axes: [Int]) -> Tensor {
        precondition(axes.sorted() == Array(0..<rank), "axes \(axes) are not a permutation of rank \(rank)")
        if axes == Array(0..<rank) { return self }
        let newShape = axes.map { shape[$0] }
        let sourceStrides = Tensor.strides(of: shape)
        let permutedStrides = axes.map { sourceStrides[$0] }
        // Walk the result's leading axes; copy `run` contiguous elements at each step.
        let keepsLast = axes[rank - 1] == rank - 1
        let walked = keepsLast ? rank - 1 : rank
        let run = keepsLast ? shape[rank - 1] : 1
        var result = Tensor(uninitializedShape: newShape)
        guard count > 0 else { return result }
        var index = [Int](repeating: 0, count: walked)
        scalars.withUnsafeBufferPointer { source in
            result.scalars.withUnsafeMutableBufferPointer { target in
                var sourceOffset = 0
                for step in 0..<(count / run) {
                    (target.baseAddress! + step * run).update(from: source.baseAddress! + sourceOffset, count: run)
                    // Advance the multi-index in row-major order of the result.
                    var axis = walked - 1
                    while axis >= 0 {
                        index[axis] += 1
                        sourceOffset += permutedStrides[axis]
                        if index[axis] < newShape[axis] { break }
                        sourceOffset -= permutedStrides[axis] * newShape[axis]
                        index[axis] = 0
                        axis -= 1
                    }
                }
            }
        }
        return result
    }

    /// Swaps the two axes of a matrix.
    public var transposed: Tensor {
        precondition(rank == 2, "transposed needs a matrix, got \(shape)")
        return permuted([1, 0])
    }

    /// Concatenates tensors along `axis`; all other extents must agree.
    public static func concatenate(_ parts: [Tensor], axis: Int) -> Tensor {
        precondition(!parts.isEmpty, "concatenate of nothing")
        let first = parts[0].shape
        for part in parts {
            precondition(part.rank == first.count, "concatenate rank mismatch")
            for d in 0..<first.count where d != axis {
                precondition(part.shape[d] == first[d], "concatenate shape mismatch \(part.shape) vs \(first)")
            }
        }
        let outer = first[..<axis].reduce(1, *)
        let inner = first[(axis + 1)...].reduce(1, *)
        var shape = first
        shape[axis] = parts.reduce(0) { $0 + $1.shape[axis] }
        var result = [Float]()
        result.reserveCapacity(shape.product)
        for o in 0..<outer {
            for part in parts {
                let chunk = part.shape[axis] * inner
                result.append(contentsOf: part.scalars[(o * chunk)..<((o + 1) * chunk)])
            }
        }
        return Tensor(shape: shape, scalars: result)
    }

    /// The slice `start..<end` of `axis`, copied.
    public func slice(axis: Int, _ range: Range<Int>) -> Tensor {
        precondition(range.lowerBound >= 0 && range.upperBound <= shape[axis], "slice \(range) out of axis \(axis) of \(shape)")
        let outer = shape[..<axis].reduce(1, *)
        let inner = shape[(axis + 1)...].reduce(1, *)
        var newShape = shape
        newShape[axis] = range.count
        var result = [Float]()
        result.reserveCapacity(newShape.product)
        for o in 0..<outer {
            let base = (o * shape[axis] + range.lowerBound) * inner
            result.append(contentsOf: scalars[base..<(base + range.count * inner)])
        }
        return Tensor(shape: newShape, scalars: result)
    }
}
