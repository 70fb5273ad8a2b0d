import LycorisCore

/// The inputs of a factor chain's stages as one step's forward computed them, kept on the
/// step's tape (``DeltaContext/stageCache``) so that the backward does not run the chain's
/// leading ops again (for LoRA on a 3×3 conv, a quarter of the step).
///
/// An entry is used only for the same key it was stored with: the input x and the factor
/// tensors the stages were computed from. `Tensor`'s `==` compares storage identity first,
/// so the server's backward (which passes the forward's own x) matches in O(1), and any
/// other x or changed factors fall back to recomputing.
public final class StageCache: @unchecked Sendable {
    private var key: [Tensor] = []
    private var stageInputs: [Tensor]?
    /// For each stage input, its zero-padded copy where a ``DirectConvolution`` stage read one.
    private var padded: [DirectConvolution.PaddedInput?] = []

    public init() {}

    public func store(_ stageInputs: [Tensor], padded: [DirectConvolution.PaddedInput?] = [], for key: [Tensor]) {
        (self.key, self.stageInputs, self.padded) = (key, stageInputs, padded)
    }

    /// The stored stage inputs when `key` equals the stored key, else nil.
    public func stageInputs(for key: [Tensor]) -> [Tensor]? {
        guard let stageInputs, key == self.key else { return nil }
        return stageInputs
    }

    /// The stored stage inputs and their padded copies (nil where none was stored) when
    /// `key` equals the stored key, else nil.
    public func tape(for key: [Tensor]) -> (inputs: [Tensor], padded: [DirectConvolution.PaddedInput?])? {
        guard let stageInputs = stageInputs(for: key) else { return nil }
        return (stageInputs, padded.isEmpty ? Array(repeating: nil, count: stageInputs.count) : padded)
    }
}
