import LycorisCore

/// The orthogonal transforms of Diag-OFT and BOFT: Cayley rotations of free blocks, applied
/// block-diagonally to the rows of a matrix (a base weight's output rows, or activations
/// with the channel axis first), stage after stage.
///
/// Cayley (LyCORIS `get_r`): from free blocks A (count, b, b), P = A − Aᵀ (skew); with a
/// constraint C > 0 and n = ‖P‖ + 1e-8 (one Frobenius norm over every block) > C,
/// Q = P·C/n, else Q = P; R = (I + Q)(I − Q)⁻¹ (orthogonal).
/// With M = I + Q (so Mᵀ = I − Q): R = M·M⁻ᵀ — a solve with M's LU, no inverse — and
/// dR = 2(I − Q)⁻¹·dQ·(I − Q)⁻¹, so ∂Q = 2·M⁻¹·∂R·M⁻¹ (two solves with the same LU).
/// The constraint's scaling back-propagates as ∂P = (C/n)·(∂Q − ⟨P, ∂Q⟩/(n·‖P‖)·P);
/// ∂A = ∂P − ∂Pᵀ.
///
/// Stage i: rows permuted by πᵢ (or not), multiplied by the block-diagonal Dᵢ =
/// m·Rᵢ + (1 − m)·I (Rᵢᵀ with `transposed`), permuted back. The states Z₀ … Zₛ are kept
/// for the backward: ∂Dᵢ,ₖ = (πᵢ∂Zᵢ₊₁)ₖ·(πᵢZᵢ)ₖᵀ, ∂Zᵢ = πᵢ⁻¹·Dᵢᵀ·πᵢ∂Zᵢ₊₁, ∂Rᵢ = m·∂Dᵢ.
/// πᵢ is BOFT's butterfly: the rows grouped as (c, 2, k) reordered to (c, k, 2) (a swap of
/// the middle axes), k given per stage.
///
/// The blocks' own math (the skew part, the constraint, the Cayley transform with its LU,
/// and ∂A from ∂R) is small — stages·count blocks of b×b — and runs on the host; the work on
/// the rows (permutations, block-diagonal products, ∂D) is generic over the ``WeightAlgebra``,
/// so a device runs it on device memory with the Dᵢ uploaded and the ∂Dᵢ read back.
public struct OrthogonalChain {
    let blockSize: Int
    /// Blocks per stage.
    let blockCount: Int
    let multiplier: Float
    let transposed: Bool
    /// k of stage i's butterfly πᵢ (nil: no permutation).
    let butterflies: [Int?]
    /// Dᵢ of every stage, (stages·count, b, b).
    private let stageBlocks: [Float]
    private let lu: [LUFactorization]
    private let skew: Tensor
    private let skewNorm: Double
    /// C/n when the constraint rescales Q.
    private let constraintFactor: Float?

    /// `blocks` (stages·count, b, b), stage-major.
    init(blocks: Tensor, blockCount: Int, constraint: Float, transposed: Bool, butterflies: [Int?], multiplier m: Float) throws {
        let b = blocks.shape.last!
        blockSize = b
        self.blockCount = blockCount
        self.multiplier = m
        self.transposed = transposed
        self.butterflies = butterflies
        let total = blocks.count / (b * b)
        var p = blocks
        for k in 0..<total {
            for i in 0..<b { for j in 0..<b { p.scalars[(k * b + i) * b + j] = blocks.scalars[(k * b + i) * b + j] - blocks.scalars[(k * b + j) * b + i] } }
        }
        skew = p
        skewNorm = p.scalars.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        let n = skewNorm + 1e-8
        if constraint > 0 && n > Double(constraint) {
            constraintFactor = Float(Double(constraint) / n)
        } else {
            constraintFactor = nil
        }
        let q = p * (constraintFactor ?? 1)
        var factors: [LUFactorization] = []
        var d = [Float]()
        d.reserveCapacity(blocks.count)
        for k in 0..<total {
            var matrix = Tensor(shape: [b, b], scalars: Array(q.scalars[(k * b * b)..<((k + 1) * b * b)]))
            for i in 0..<b { matrix.scalars[i * b + i] += 1 }
            guard let factor = LUFactorization(matrix) else {
                throw AdapterError("oft_blocks are not finite: the Cayley transform I + Q cannot be factored")
            }
            factors.append(factor)
            var r = factor.rightDivideTransposed(matrix)  // M·M⁻ᵀ
            if transposed { r = r.transposed }
            r = r * m
            for i in 0..<b { r.scalars[i * b + i] += 1 - m }
            d.append(contentsOf: r.scalars)
        }
        lu = factors
        stageBlocks = d
    }

    var stageCount: Int { butterflies.count }

    /// Z₀ … Zₛ for rows `z` (C, P).
    func forward<A: WeightAlgebra>(_ algebra: A, _ z: A.Value) -> [A.Value] {
        let d = stageBlockValues(algebra)
        var states = [z]
        for stage in 0..<stageCount {
            let h = applyBlocks(algebra, d, stage: stage, gather(algebra, states[stage], stage), transposeBlocks: false)
            states.append(scatter(algebra, h, stage))
        }
        return states
    }

    /// (∂Z₀, ∂A) from ∂Zₛ and the states of ``forward(_:_:)``; ∂A (the blocks' shape, flat
    /// (stages·count, b, b)) is computed on the host from the ∂Dᵢ read back.
    func backward<A: WeightAlgebra>(_ algebra: A, _ gradient: A.Value, states: [A.Value]) -> (input: A.Value, blocks: A.Value) {
        let b = blockSize
        let d = stageBlockValues(algebra)
        var grad = gradient
        var gradD = [A.Value?](repeating: nil, count: stageCount)
        for stage in (0..<stageCount).reversed() {
            let g = gather(algebra, grad, stage), z = gather(algebra, states[stage], stage)
            let columns = algebra.shape(of: g)[1]
            let rows = [blockCount, b, columns]
            gradD[stage] = algebra.batchedMatmul(algebra.reshaped(g, rows), transposeA: false, algebra.reshaped(z, rows),
                                                 transposeB: true, alpha: multiplier)
            grad = scatter(algebra, applyBlocks(algebra, d, stage: stage, g, transposeBlocks: true), stage)
        }
        // Read back after every stage is queued: a device waits once.
        let gradR = gradD.flatMap { algebra.hostTensor($0!).scalars }
        return (grad, algebra.constant(blockGradient(Tensor(shape: skew.shape, scalars: gradR))))
    }

    /// ∂A from ∂R of every block (∂Rᵀ where the chain uses Rᵀ).
    private func blockGradient(_ gradR: Tensor) -> Tensor {
        let b = blockSize
        var gradQ = [Float]()
        gradQ.reserveCapacity(gradR.count)
        for (k, factor) in lu.enumerated() {
            var g = Tensor(shape: [b, b], scalars: Array(gradR.scalars[(k * b * b)..<((k + 1) * b * b)]))
            if transposed { g = g.transposed }
            gradQ.append(contentsOf: (factor.rightDivide(factor.leftDivide(g)) * 2).scalars)
        }
        var gradP = Tensor(shape: skew.shape, scalars: gradQ)
        if let factor = constraintFactor {
            let n = skewNorm + 1e-8
            let projection = Float(Double(skew.dot(gradP)) / (n * skewNorm))
            gradP = (gradP - skew * projection) * factor
        }
        var gradA = gradP
        let total = gradP.count / (b * b)
        for k in 0..<total {
            for i in 0..<b { for j in 0..<b { gradA.scalars[(k * b + i) * b + j] = gradP.scalars[(k * b + i) * b + j] - gradP.scalars[(k * b + j) * b + i] } }
        }
        return gradA
    }

    /// Every Dᵢ, (stages·count, b, b), as a value of the algebra.
    private func stageBlockValues<A: WeightAlgebra>(_ algebra: A) -> A.Value {
        algebra.constant(Tensor(shape: [stageBlocks.count / (blockSize * blockSize), blockSize, blockSize], scalars: stageBlocks))
    }

    /// Dᵢ (or Dᵢᵀ) block-diagonally times the rows of `h` (count·b, P).
    private func applyBlocks<A: WeightAlgebra>(_ algebra: A, _ d: A.Value, stage: Int, _ h: A.Value,
                                               transposeBlocks: Bool) -> A.Value {
        let shape = algebra.shape(of: h)
        precondition(shape[0] == blockCount * blockSize, "\(shape[0]) rows for \(blockCount) blocks of \(blockSize)")
        let blocks = algebra.rows(d, (stage * blockCount)..<((stage + 1) * blockCount))
        return algebra.reshaped(algebra.batchedMatmul(blocks, transposeA: transposeBlocks,
                                                      algebra.reshaped(h, [blockCount, blockSize, shape[1]]),
                                                      transposeB: false, alpha: 1),
                                shape)
    }

    /// Stage `stage`'s πᵢ of the rows of `z`: (c, 2, k) → (c, k, 2).
    private func gather<A: WeightAlgebra>(_ algebra: A, _ z: A.Value, _ stage: Int) -> A.Value {
        guard let k = butterflies[stage] else { return z }
        let shape = algebra.shape(of: z)
        return algebra.reshaped(algebra.swappingMiddleAxes(z, [shape[0] / (2 * k), 2, k, shape[1]]), shape)
    }

    /// The inverse of ``gather(_:_:_:)``: (c, k, 2) → (c, 2, k).
    private func scatter<A: WeightAlgebra>(_ algebra: A, _ h: A.Value, _ stage: Int) -> A.Value {
        guard let k = butterflies[stage] else { return h }
        let shape = algebra.shape(of: h)
        return algebra.reshaped(algebra.swappingMiddleAxes(h, [shape[0] / (2 * k), k, 2, shape[1]]), shape)
    }
}
