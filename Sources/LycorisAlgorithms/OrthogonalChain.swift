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
public struct OrthogonalChain {
    let blockSize: Int
    /// Blocks per stage.
    let blockCount: Int
    let multiplier: Float
    let transposed: Bool
    /// πᵢ: permuted row j is source row πᵢ[j] (nil: no permutation).
    let permutations: [[Int]?]
    /// Dᵢ of every stage, (stages·count, b, b).
    private let stageBlocks: [Float]
    private let lu: [LUFactorization]
    private let skew: Tensor
    private let skewNorm: Double
    /// C/n when the constraint rescales Q.
    private let constraintFactor: Float?

    /// `blocks` (stages·count, b, b), stage-major.
    init(blocks: Tensor, blockCount: Int, constraint: Float, transposed: Bool, permutations: [[Int]?], multiplier m: Float) throws {
        let b = blocks.shape.last!
        blockSize = b
        self.blockCount = blockCount
        self.multiplier = m
        self.transposed = transposed
        self.permutations = permutations
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

    var stageCount: Int { permutations.count }

    /// Z₀ … Zₛ for rows `z` (C, P).
    func forward(_ z: Tensor) -> [Tensor] {
        var states = [z]
        for stage in 0..<stageCount {
            var h = Self.gather(states[stage], permutations[stage])
            h = applyBlocks(stage: stage, h, transposeBlocks: false)
            states.append(Self.scatter(h, permutations[stage]))
        }
        return states
    }

    /// (∂Z₀, ∂A) from ∂Zₛ and the states of ``forward(_:)``.
    func backward(_ gradient: Tensor, states: [Tensor]) -> (input: Tensor, blocks: Tensor) {
        let b = blockSize
        var grad = gradient
        var gradR = [Float](repeating: 0, count: stageBlocks.count)
        for stage in (0..<stageCount).reversed() {
            let g = Self.gather(grad, permutations[stage])
            let z = Self.gather(states[stage], permutations[stage])
            let columns = g.shape[1]
            g.scalars.withUnsafeBufferPointer { pg in
                z.scalars.withUnsafeBufferPointer { pz in
                    gradR.withUnsafeMutableBufferPointer { pr in
                        for k in 0..<blockCount {
                            let offset = (stage * blockCount + k) * b * b
                            BLAS.sgemm(transposeA: false, transposeB: true, m: b, n: b, k: columns, alpha: multiplier,
                                       a: pg.baseAddress! + k * b * columns, lda: columns,
                                       b: pz.baseAddress! + k * b * columns, ldb: columns,
                                       beta: 0, c: pr.baseAddress! + offset, ldc: b)
                        }
                    }
                }
            }
            grad = Self.scatter(applyBlocks(stage: stage, g, transposeBlocks: true), permutations[stage])
        }
        return (grad, blockGradient(Tensor(shape: skew.shape, scalars: gradR)))
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

    /// Dᵢ (or Dᵢᵀ) block-diagonally times the rows of `h` (count·b, P).
    private func applyBlocks(stage: Int, _ h: Tensor, transposeBlocks: Bool) -> Tensor {
        let b = blockSize, columns = h.shape[1]
        precondition(h.shape[0] == blockCount * b, "\(h.shape[0]) rows for \(blockCount) blocks of \(b)")
        var out = Tensor.zeros(h.shape)
        stageBlocks.withUnsafeBufferPointer { pd in
            h.scalars.withUnsafeBufferPointer { ph in
                out.scalars.withUnsafeMutableBufferPointer { po in
                    for k in 0..<blockCount {
                        BLAS.sgemm(transposeA: transposeBlocks, transposeB: false, m: b, n: columns, k: b, alpha: 1,
                                   a: pd.baseAddress! + (stage * blockCount + k) * b * b, lda: b,
                                   b: ph.baseAddress! + k * b * columns, ldb: columns,
                                   beta: 0, c: po.baseAddress! + k * b * columns, ldc: columns)
                    }
                }
            }
        }
        return out
    }

    /// Rows `permutation[j]` of `z` in order j.
    static func gather(_ z: Tensor, _ permutation: [Int]?) -> Tensor {
        guard let permutation else { return z }
        let columns = z.shape[1]
        var out = [Float]()
        out.reserveCapacity(z.count)
        for source in permutation { out.append(contentsOf: z.scalars[(source * columns)..<((source + 1) * columns)]) }
        return Tensor(shape: z.shape, scalars: out)
    }

    /// The inverse of ``gather(_:_:)``: row j of `h` goes to row `permutation[j]`.
    static func scatter(_ h: Tensor, _ permutation: [Int]?) -> Tensor {
        guard let permutation else { return h }
        let columns = h.shape[1]
        var out = h
        for (j, target) in permutation.enumerated() {
            out.scalars.replaceSubrange((target * columns)..<((target + 1) * columns), with: h.scalars[(j * columns)..<((j + 1) * columns)])
        }
        return out
    }
}
