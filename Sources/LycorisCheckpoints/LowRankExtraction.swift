import LycorisCore

/// LyCORIS 4.1.3's extraction of one layer's change ΔW = W_tuned − W_base (`extract_linear`,
/// `extract_conv`, and the per-layer part of `extract_diff` in `lycoris/utils`), with its rank
/// rules exactly. ΔW is (out, in) for a Linear, (out, in, kh, kw) for a Conv2d, read as the
/// matrix (out, in·kh·kw) with singular values S₁ ≥ S₂ ≥ ….
///
/// Rank r before the clamps, by mode (p the linear or conv parameter; 1×1 convs use the
/// linear one):
/// - `fixed`: r = p;
/// - `threshold`: r = #{S_i > p};
/// - `ratio`: r = #{S_i > p·S₁};
/// - `quantile`: r = #{i : S₁ + … + S_i < p·ΣS}.
///
/// Then r = min(out, in, max(1, r)) — `in` the input channels, not in·kh·kw — and when
/// r ≥ out/2 the layer is stored whole (`diff` = ΔW, `diff_b` = Δb where the layer has a
/// bias). Otherwise `lora_down` = Vt[:r] (r, in[, kh, kw]), `lora_up` = U[:, :r]·diag(S[:r])
/// (out, r[, 1, 1]), `alpha` = r (scale 1), ΔW ≈ up·down.
///
/// Tucker (k×k convs unless disabled, LyCORIS's `small_conv`): down (r, in, kh, kw) is split
/// again — the SVD of downᵀ read as (in, r·kh·kw) at rank r₂ = min(in, r) (no fall-back) gives
/// `lora_mid` (r, r₂, kh, kw) and a 1×1 `lora_down` (r₂, in, 1, 1), `alpha` = r₂, and
/// ΔW ≈ Σ_{i,j} up[:, i]·mid[i, j]·down[j, :].
///
/// Sparse bias (`use_bias`): the residual R = ΔW − approximation as (out, in·kh·kw) keeps its
/// entries with |R| ≥ the `sparsity` quantile of |R| (linear interpolation, as numpy), stored
/// as `bias_indices` (I16, (2, nnz), row then column, row-major order), `bias_values`,
/// `bias_size` (I16, [out, in·kh·kw]). LyCORIS 4.1.3 takes the Tucker case's residual
/// against the *tuned weight* instead of ΔW; here it is ΔW − approximation in every case.
public enum LowRankExtraction {
    public enum Mode: String, Sendable, CaseIterable {
        case fixed, threshold, ratio, quantile, full
    }

    public struct Options: Sendable {
        public var mode: Mode
        public var linearParameter: Float
        public var convParameter: Float
        public var tucker = true
        public var sparseBias = false
        public var sparsity: Float = 0.98
        /// Fixed ranks by the randomised SVD unless set (the other modes need every S_i).
        public var exact = false

        public init(mode: Mode, linearParameter: Float, convParameter: Float) {
            self.mode = mode
            self.linearParameter = linearParameter
            self.convParameter = convParameter
        }
    }

    /// One layer's result.
    public struct Result: Sendable {
        public enum Kind: String, Sendable { case lowRank = "low rank", full, unchanged }
        public var kind: Kind
        /// Tensors by suffix (`lora_down.weight`, `lora_up.weight`, `lora_mid.weight`, `alpha`,
        /// `diff`, `diff_b`, `bias_values`); integer tensors in ``integers``.
        public var tensors: [(suffix: String, tensor: Tensor)] = []
        public var integers: [(suffix: String, values: [Int16], shape: [Int])] = []
        public var rank: Int?
        /// ‖ΔW − stored approximation‖_F / ‖ΔW‖_F (0 for full and unchanged layers).
        public var relativeError: Float = 0
    }

    /// LyCORIS's rank for `singularValues` before the clamps.
    public static func rawRank(mode: Mode, parameter: Float, singularValues s: [Float]) -> Int {
        switch mode {
        case .fixed: return Int(parameter)
        case .threshold: return s.filter { $0 > parameter }.count
        case .ratio:
            let floor = (s.max() ?? 0) * parameter
            return s.filter { $0 > floor }.count
        case .quantile:
            let target = parameter * s.reduce(0, +)
            var sum: Float = 0
            var count = 0
            for value in s {
                sum += value
                if sum < target { count += 1 }
            }
            return count
        case .full: return Int.max
        }
    }

    /// Whether torch.allclose(tuned, base) holds: |tuned − base| ≤ 1e-8 + 1e-5·|base| everywhere.
    public static func isUnchanged(base: Tensor, tuned: Tensor) -> Bool {
        zip(base.scalars, tuned.scalars).allSatisfy { abs($1 - $0) <= 1e-8 + 1e-5 * abs($0) }
    }

    /// Extracts ΔW (weight shape) and Δb (nil when the layer has no bias).
    public static func extract(delta: Tensor, biasDelta: Tensor?, options: Options, seed: UInt64 = 0) throws -> Result {
        let shape = delta.shape
        let full = Result(kind: .full, tensors: [("diff", delta)] + (biasDelta.map { [("diff_b", $0)] } ?? []))
        guard options.mode != .full, shape.count == 2 || shape.count == 4 else { return full }
        let (out, inChannels) = (shape[0], shape[1])
        let kernel = Array(shape.dropFirst(2))
        let isPointwise = kernel.allSatisfy { $0 == 1 }
        let parameter = isPointwise ? options.linearParameter : options.convParameter
        let matrix = delta.reshaped([out, delta.count / out])

        let svd: SingularValueDecomposition
        var rank: Int
        if options.mode == .fixed && !options.exact {
            rank = clamp(rawRank(mode: .fixed, parameter: parameter, singularValues: []), out: out, in: inChannels)
            if Double(rank) >= Double(out) / 2 { return full }
            svd = try matrix.randomizedSingularValueDecomposition(rank: rank, seed: seed)
        } else {
            svd = try matrix.singularValueDecomposition()
            rank = clamp(rawRank(mode: options.mode, parameter: parameter, singularValues: svd.s), out: out, in: inChannels)
            if Double(rank) >= Double(out) / 2 { return full }
        }
        var (up, down) = svd.factors(rank: rank)
        var result = Result(kind: .lowRank, rank: rank)
        var effectiveDown = down   // (rank, in·kh·kw): what up multiplies
        if options.tucker && !isPointwise && shape.count == 4 {
            // downᵀ as (in, r·kh·kw); its SVD at r₂ = min(in, r) (LyCORIS's is_cp call: no fall-back).
            let transposed = down.reshaped([rank, inChannels] + kernel).permuted([1, 0, 2, 3]).reshaped([inChannels, rank * kernel.reduce(1, *)])
            let inner = try transposed.singularValueDecomposition()
            let rank2 = min(inChannels, rank, max(1, rank))
            let (innerUp, innerDown) = inner.factors(rank: rank2)          // (in, r₂), (r₂, r·kh·kw)
            let mid = innerDown.reshaped([rank2, rank] + kernel).permuted([1, 0, 2, 3])   // (r, r₂, kh, kw)
            let pointwise = innerUp.permuted([1, 0])                        // (r₂, in)
            effectiveDown = tuckerDown(mid: mid, down: pointwise)
            result.tensors = [("lora_mid.weight", mid), ("lora_down.weight", pointwise.reshaped([rank2, inChannels, 1, 1])),
                              ("lora_up.weight", up.reshaped([out, rank, 1, 1])), ("alpha", Tensor(shape: [1], scalars: [Float(rank2)]))]
        } else {
            down = down.reshaped([rank, inChannels] + kernel)
            up = up.reshaped([out, rank] + kernel.map { _ in 1 })
            result.tensors = [("lora_down.weight", down), ("lora_up.weight", up), ("alpha", Tensor(shape: [1], scalars: [Float(rank)]))]
        }
        var residual = matrix - Tensor.matmul(up.reshaped([out, rank]), effectiveDown)
        if options.sparseBias {
            let kept = sparse(residual, sparsity: options.sparsity)
            result.integers = [("bias_indices", kept.indices, [2, kept.values.count]),
                               ("bias_size", [Int16(truncatingIfNeeded: out), Int16(truncatingIfNeeded: residual.shape[1])], [2])]
            result.tensors.append(("bias_values", Tensor(shape: [kept.values.count], scalars: kept.values)))
            for (position, value) in zip(kept.positions, kept.values) { residual.scalars[position] -= value }
        }
        let norm = matrix.norm
        result.relativeError = norm > 0 ? residual.norm / norm : 0
        return result
    }

    /// The (r, in·kh·kw) down factor a Tucker core mid (r, r₂, kh, kw) and a pointwise down
    /// (r₂, in) make: A[i, c, k, l] = Σ_j mid[i, j, k, l]·down[j, c].
    public static func tuckerDown(mid: Tensor, down: Tensor) -> Tensor {
        let (rank, rank2, kernel, inChannels) = (mid.shape[0], mid.shape[1], Array(mid.shape.dropFirst(2)), down.shape[1])
        // mid as (r·kh·kw, r₂) after moving r₂ last, times (r₂, in), back to (r, in, kh, kw).
        let midRows = mid.permuted([0, 2, 3, 1]).reshaped([rank * kernel.reduce(1, *), rank2])
        return Tensor.matmul(midRows, down).reshaped([rank] + kernel + [inChannels])
            .permuted([0, 3, 1, 2]).reshaped([rank, inChannels * kernel.reduce(1, *)])
    }

    static func clamp(_ rank: Int, out: Int, in inChannels: Int) -> Int { min(out, inChannels, max(1, rank)) }

    /// numpy's linear-interpolation quantile of `values` at q ∈ [0, 1].
    public static func quantile(_ values: [Float], _ q: Float) -> Float {
        let sorted = values.sorted()
        guard let last = sorted.indices.last else { return 0 }
        let position = Double(q) * Double(last)
        let low = Int(position.rounded(.down)), high = min(low + 1, last)
        let fraction = Float(position - Double(low))
        return sorted[low] + (sorted[high] - sorted[low]) * fraction
    }

    /// The entries of a (rows, columns) matrix with |x| ≥ the `sparsity` quantile of |x| and
    /// x ≠ 0, in row-major order: I16 indices (rows then columns), values, flat positions.
    static func sparse(_ matrix: Tensor, sparsity: Float) -> (indices: [Int16], values: [Float], positions: [Int]) {
        let threshold = quantile(matrix.scalars.map(abs), sparsity)
        let columns = matrix.shape[1]
        let positions = matrix.scalars.indices.filter { abs(matrix.scalars[$0]) >= threshold && matrix.scalars[$0] != 0 }
        let rows = positions.map { Int16(truncatingIfNeeded: $0 / columns) }
        let cols = positions.map { Int16(truncatingIfNeeded: $0 % columns) }
        return (rows + cols, positions.map { matrix.scalars[$0] }, positions)
    }
}
