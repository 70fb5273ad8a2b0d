import LycorisCore

/// The elementwise transfer of an output-side adapter: instead of m·Δ(x) = op(x, m·ΔW) (a
/// whole GEMM or convolution for IA3), the module maps the tensor it scales to its adapted
/// value in one elementwise pass, and the caller applies the base layer where needed:
///
///     side output: t = y = op(x, W0) + b  →  y'   (the adapted layer's output)
///     side input:  t = x                  →  x'   (then y' = op(x', W0) + b)
///
/// Available for IA3 without `dropout` and `rank_dropout` (their masks act on ΔW's rows or
/// on Δ(x), which this pass does not see); `module_dropout` skips the module (t' = t).
extension AdapterModule {
    public enum ElementwiseSide: String, Sendable {
        case output, input
    }

    /// Which tensor the elementwise transfer takes, or nil when the module has none.
    public var elementwiseSide: ElementwiseSide? {
        guard let ia3 = algorithm as? IA3, options.dropout == 0, options.rankDropout == 0 else { return nil }
        return ia3.onInput ? .input : .output
    }

    /// The problem with `shape` as the elementwise transfer's tensor, or nil: the layer's
    /// input shape on the input side; on the output side an output shape (out channels on
    /// the channel axis: last for linear, 1 for conv of the layer's spatial rank).
    public func elementwiseProblem(_ shape: [Int]) -> String? {
        guard let side = elementwiseSide else {
            return "\(name) has no elementwise transfer (only ia3 without dropout and rank_dropout has one)"
        }
        if side == .input { return layer.inputProblem(shape) }
        let axis = layer.isConvolution ? 1 : shape.count - 1
        let rank = layer.isConvolution ? layer.kernelSize.count + 2 : max(shape.count, 1)
        guard shape.count == rank, axis >= 0, shape[axis] == layer.outFeatures else {
            return "the base output of \(name) must have \(layer.outFeatures) channels on axis \(axis)"
                + (layer.isConvolution ? " and \(rank) axes" : "") + ", got shape \(shape)"
        }
        return nil
    }

    /// t' for the step `tape` describes (see the type's comment).
    public func forwardElementwise(_ t: Tensor, tape: Tape) throws -> Tensor {
        let ia3 = try elementwiseIA3(t.shape)
        if tape.skipped { return t }
        return ia3.elementwise(t, multiplier: multiplier, bias: tape.bypass ? nil : baseBias)
    }

    /// (∂t, ∂parameters) of ``forwardElementwise(_:tape:)`` given ∂t'.
    public func backwardElementwise(_ t: Tensor, gradOutput: Tensor, tape: Tape) throws -> (input: Tensor, parameters: ParameterSet) {
        let ia3 = try elementwiseIA3(t.shape)
        if tape.skipped { return (gradOutput, zeroGradients()) }
        return ia3.elementwiseBackward(t, gradOutput: gradOutput, multiplier: multiplier, bias: tape.bypass ? nil : baseBias)
    }

    private func elementwiseIA3(_ shape: [Int]) throws -> IA3 {
        if let problem = elementwiseProblem(shape) { throw AdapterError(problem) }
        return algorithm as! IA3  // elementwiseProblem is nil only for IA3

    }
}
