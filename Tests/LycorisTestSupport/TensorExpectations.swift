import LycorisCore
import Testing

/// max|actual − expected| / max|expected| (the error relative to the expected tensor's
/// scale; the absolute error when the expected tensor is all zeros), shapes checked first.
public func relativeError(_ actual: Tensor, _ expected: Tensor) -> Float {
    precondition(actual.shape == expected.shape, "shape \(actual.shape) vs expected \(expected.shape)")
    var worst: Float = 0
    for i in actual.scalars.indices { worst = max(worst, abs(actual.scalars[i] - expected.scalars[i])) }
    let scale = expected.maxAbs
    return scale > 0 ? worst / scale : worst
}

/// Expects `actual` to equal `expected` within `tolerance` relative error, naming `what`.
public func expectClose(_ actual: Tensor, _ expected: Tensor, tolerance: Float = 1e-5, _ what: String,
                        sourceLocation: SourceLocation = #_sourceLocation) {
    guard actual.shape == expected.shape else {
        Issue.record("\(what): shape \(actual.shape), expected \(expected.shape)", sourceLocation: sourceLocation)
        return
    }
    #expect(expected.maxAbs > 0 || actual.maxAbs == 0, "\(what): the expected tensor is all zeros", sourceLocation: sourceLocation)
    let error = relativeError(actual, expected)
    #expect(error <= tolerance, "\(what): relative error \(error) > \(tolerance)", sourceLocation: sourceLocation)
}

/// A reproducible tensor of normal values (the library's own generator, seeded).
public func randomTensor(_ shape: [Int], seed: UInt64, std: Float = 1) -> Tensor {
    var random = RandomSource(seed: seed)
    return .normal(shape, std: std, using: &random)
}
