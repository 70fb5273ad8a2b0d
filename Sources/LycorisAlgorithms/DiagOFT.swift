import LycorisCore

/// Diag-OFT (LyCORIS `DiagOFTModule`, orthogonal fine-tuning): the base weight's output rows
/// are rotated block by block, W' = rescale ⊙ (blockdiag(Rₖᵀ)·W0).
///
/// Shapes: (b, n) = factorization(out, lora_dim) (b ≤ n, b·n = out); `oft_blocks` (n, b, b),
/// init 0 (so R = I and W' = W0); with `rescaled`, `rescale` (out, 1…) of the weight's rank,
/// init 1. Rₖ is the Cayley transform of block k (``OrthogonalChain``), bounded by the
/// constraint C = constraint·out when constraint > 0; LyCORIS multiplies Rₖᵀ into the rows
/// (its einsum `k n m, k n … -> k m …`).
/// Multiplier (LyCORIS's rebuild): W'(m) = rescale ⊙ ((m·Rᵀ + (1 − m)·I)·W0), i.e.
/// ΔW(m) = rescale ⊙ m·(Rᵀ − I)·W0 + (rescale − 1) ⊙ W0. Bypass: the same transform of the
/// base output's channels (``OrthogonalAdapter``). Backward: ``OrthogonalChain``.
/// Files: `oft_blocks`, `rescale` (when rescaled), `alpha` = the constraint (not a scale).
public struct DiagOFT: OrthogonalAdapter {
    public static let algorithm = Algorithm.diagOFT
    public let layer: LayerSpec
    public var parameters: ParameterSet
    /// The constraint per output channel (saved as `alpha`); 0: unconstrained.
    public let constraint: Float
    public let blockSize: Int
    public let blockCount: Int

    public init(layer: LayerSpec, options: AdapterOptions, random: inout RandomSource) throws {
        let out = layer.outFeatures
        let (b, n) = factorization(out, factor: options.rank)
        try self.init(layer: layer, blocksShape: [n, b, b], options: options)
    }

    public init(layer: LayerSpec, orthogonalParameters p: ParameterSet, constraint: Float) throws {
        self.layer = layer
        let blocks = p.required("oft_blocks")
        let out = layer.outFeatures
        guard blocks.rank == 3, blocks.shape[1] == blocks.shape[2], blocks.shape[0] * blocks.shape[1] == out else {
            throw AdapterError("diag-oft: oft_blocks has shape \(blocks.shape), expected (n, b, b) with n·b = \(out) output channels")
        }
        try Self.checkRescaleAndConstraint(p, constraint, layer: layer)
        (blockCount, blockSize) = (blocks.shape[0], blocks.shape[1])
        self.constraint = constraint
        parameters = p
    }

    static func rescaleShape(_ layer: LayerSpec) -> [Int] {
        [layer.outFeatures] + Array(repeating: 1, count: layer.weightShape.count - 1)
    }

    public func chain(blocks: Tensor, multiplier m: Float) throws -> OrthogonalChain {
        try OrthogonalChain(blocks: blocks, blockCount: blockCount, constraint: constraint * Float(layer.outFeatures),
                            transposed: true, butterflies: [nil], multiplier: m)
    }

    public func savedTensors() -> [SavedTensor] { orthogonalSavedTensors(constraint: constraint) }
}
