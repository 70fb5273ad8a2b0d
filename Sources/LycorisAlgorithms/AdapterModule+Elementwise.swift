import LycorisCore

/// The elementwise transfer of an output-side adapter: instead of m·Δ(x) = op(x, m·ΔW) (a
/// whole GEMM or convolution for IA3), the module maps the tensor it scales to its adapted
/// value in one elementwise pass, and the caller applies the base layer where needed:
///
///     side output:            t = y = op(x, W0) + b  →  y'   (the adapted layer's output)
///     side input:             t = x                  →  x'   (then y' = op(x', W0) + b)
///     side output_with_input: t = y, and x as well   →  y'   (DoRA's factor path)
///
/// Available for IA3 without `dropout` and `rank_dropout` (their masks act on ΔW's rows or
/// on Δ(x), which this pass does not see), and for DoRA with the norm per output row, a base
/// algorithm with a factor path and no `rank_dropout` (``DoRA/factorForward``: y' from y and
/// the low-rank chain on x, one pass over y); `module_dropout` skips the module (t' = t).
extension AdapterModule {
    public enum ElementwiseSide: String, Sendable {
        case output, input
        case outputWithInput = "output_with_input"
    }

    /// Which tensor the elementwise transfer takes, or nil when the module has none.
    public var elementwiseSide: ElementwiseSide? {
        if let dora = algorithm as? any FactorPathDecomposition {
            return dora.hasFactorPath && options.rankDropout == 0 ? .outputWithInput : nil
        }
        guard let ia3 = algorithm as? IA3, options.dropout == 0, options.rankDropout == 0 else { return nil }
        return ia3.onInput ? .input : .output
    }

    /// The problem with `shape` as the elementwise transfer's tensor, or nil: the layer's
    /// input shape on the input side; on the output side an output shape (out channels on
    /// the channel axis: last for linear, 1 for conv of the layer's spatial rank).
    public func elementwiseProblem(_ shape: [Int]) -> String? {
        guard let side = elementwiseSide else {
            return "\(name) has no elementwise transfer (only ia3 without dropout and rank_dropout, and dora with wd_on_out"
                + " and no rank_dropout, have one)"
        }
        if side == .input { return layer.inputProblem(shape) }  // .output and .outputWithInput: a base output
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

    /// DoRA's factor path (side output_with_input): y' from the base output `t` and the
    /// layer input `x`, and what its backward reads (s = y + Δ(x)).
    public func forwardElementwise(_ t: Tensor, layerInput x: Tensor, tape: Tape) throws -> (output: Tensor, saved: Tensor) {
        let dora = try elementwiseDoRA(t.shape, layerInput: x.shape)
        if tape.skipped { return (t, t) }
        let result = try dora.factorForward(x, baseOutput: t, bias: baseBias, multiplier: multiplier, tape.context)
        return (result.output, result.directed)
    }

    /// (∂t, ∂x, ∂parameters) of ``forwardElementwise(_:layerInput:tape:)`` given ∂y', with
    /// `saved` what that forward returned.
    public func backwardElementwise(saved: Tensor, layerInput x: Tensor, gradOutput: Tensor,
                                    tape: Tape) throws -> (input: Tensor, layerInput: Tensor, parameters: ParameterSet) {
        let dora = try elementwiseDoRA(saved.shape, layerInput: x.shape)
        if tape.skipped { return (gradOutput, .zeros(x.shape), zeroGradients()) }
        let grads = try dora.factorBackward(x, directed: saved, bias: baseBias, gradOutput: gradOutput, multiplier: multiplier, tape.context)
        return (grads.baseOutput, grads.input, grads.parameters)
    }

    private func elementwiseDoRA(_ shape: [Int], layerInput: [Int]) throws -> any FactorPathDecomposition {
        guard elementwiseSide == .outputWithInput, let dora = algorithm as? any FactorPathDecomposition else {
            throw AdapterError("\(name) has no output_with_input elementwise transfer (dora with wd_on_out and no rank_dropout has one)")
        }
        if let problem = layer.inputProblem(layerInput) { throw AdapterError("\(name): \(problem)") }
        if let problem = elementwiseProblem(shape) { throw AdapterError(problem) }
        guard shape == layer.outputShape(forInput: layerInput) else {
            throw AdapterError("the base output of \(name) has shape \(shape), expected \(layer.outputShape(forInput: layerInput)) for input \(layerInput)")
        }
        return dora
    }

    private func elementwiseIA3(_ shape: [Int]) throws -> IA3 {
        guard let ia3 = algorithm as? IA3 else { throw AdapterError("\(name) takes its elementwise transfer with the layer input (side output_with_input)") }
        if let problem = elementwiseProblem(shape) { throw AdapterError(problem) }
        return ia3

    }
}
