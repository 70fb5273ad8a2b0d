import LycorisCore

/// An algorithm whose factor path applies the multiplier inside a small factor (LoCon's up,
/// LoHa's U, LoKr's W1, DyLoRA's up): ``AdapterAlgorithm/multipliedBypassForward(_:multiplier:_:)``
/// and its backward are the primary implementation, and the plain bypass is them with m = 1,
/// so that no pass over the activation scales Δ(x) or its gradient.
public protocol MultiplierInFactors: AdapterAlgorithm {}

extension MultiplierInFactors {
    public func bypassForward(_ x: Tensor, _ context: DeltaContext) throws -> Tensor {
        try multipliedBypassForward(x, multiplier: 1, context)
    }

    public func bypassBackward(_ x: Tensor, gradOutput: Tensor, _ context: DeltaContext) throws -> (input: Tensor, parameters: ParameterSet) {
        try multipliedBypassBackward(x, gradOutput: gradOutput, multiplier: 1, context)
    }
}
