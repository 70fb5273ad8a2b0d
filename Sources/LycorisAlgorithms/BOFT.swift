import LycorisCore

/// BOFT (LyCORIS `ButterflyOFTModule`, butterfly orthogonal fine-tuning): the base weight's
/// output rows pass through s butterfly stages, W' = rescale ⊙ (Bₛ₋₁ ⋯ B₀·W0).
///
/// Shapes: (b, n) = power2Factorization(out, lora_dim) (b even, n a power of two, b·n = out;
/// none: an error, as in LyCORIS); s = popcount(n − 1) + 1 stages; `oft_blocks` (s, n, b, b),
/// init 0; with `rescaled`, `rescale` (out, 1…), init 1.
/// Stage i (k = 2ⁱ·b/2): the rows, grouped as (c, 2, k), are reordered to (c, k, 2); the
/// block-diagonal of the stage's Cayley rotations Rᵢ,ⱼ (``OrthogonalChain``, one constraint
/// norm over all stages, bound constraint·out) multiplies consecutive groups of b rows; the
/// order is restored. Multiplier: each stage's blocks become m·Rᵢ,ⱼ + (1 − m)·I (LyCORIS
/// blends every stage, not the product). Bypass: the same on the base output's channels.
/// Files: `oft_blocks` (4-D: what tells BOFT from Diag-OFT), `rescale`, `alpha` = constraint.
public struct BOFT: OrthogonalAdapter {
    public static let algorithm = Algorithm.boft
    public let layer: LayerSpec
    public var parameters: ParameterSet
    /// The constraint per output channel (saved as `alpha`); 0: unconstrained.
    public let constraint: Float
    public let blockSize: Int
    public let blockCount: Int
    public let stageCount: Int

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        let out = layer.outFeatures
        guard let (b, n) = power2Factorization(out, factor: options.rank) else {
            throw AdapterError("boft: \(out) output channels cannot be split into even blocks of at most \(options.rank) times a power of two")
        }
        try self.init(layer: layer, blocksShape: [Self.maximumStages(blockCount: n), n, b, b], options: options)
    }

    public init(layer: LayerSpec, orthogonalParameters p: ParameterSet, constraint: Float) throws {
        self.layer = layer
        let blocks = p.required("oft_blocks")
        let out = layer.outFeatures
        let s = blocks.shape
        guard s.count == 4, s[2] == s[3], s[2] % 2 == 0, s[1] * s[2] == out, s[1].nonzeroBitCount == 1,
              (1...Self.maximumStages(blockCount: s[1])).contains(s[0]) else {
            throw AdapterError("boft: oft_blocks has shape \(s), expected (stages, n, b, b) with b even, n a power of two, "
                               + "n·b = \(out) output channels and 1…popcount(n − 1) + 1 stages")
        }
        try Self.checkRescaleAndConstraint(p, constraint, layer: layer)
        (stageCount, blockCount, blockSize) = (s[0], s[1], s[2])
        self.constraint = constraint
        parameters = p
    }

    /// LyCORIS's stage count for n blocks: popcount(n − 1) + 1.
    static func maximumStages(blockCount n: Int) -> Int { (n - 1).nonzeroBitCount + 1 }

    /// Stage i's butterfly half-group k = 2ⁱ·b/2: the rows grouped as (c, 2, k) are reordered
    /// to (c, k, 2).
    func butterfly(stage i: Int) -> Int { (1 << i) * blockSize / 2 }

    public func chain(blocks: Tensor, multiplier m: Float) throws -> OrthogonalChain {
        try OrthogonalChain(blocks: blocks, blockCount: blockCount, constraint: constraint * Float(layer.outFeatures),
                            transposed: false, butterflies: (0..<stageCount).map { butterfly(stage: $0) }, multiplier: m)
    }

    public func savedTensors() -> [SavedTensor] { orthogonalSavedTensors(constraint: constraint) }
}
