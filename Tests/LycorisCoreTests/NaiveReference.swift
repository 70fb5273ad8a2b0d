import LycorisCore
import LycorisTestSupport
import Testing

// Shared oracles for the core tests: deterministic test data that does not come from the
// library's own RandomSource, row-major index arithmetic, and naive reference loops
// (matrix product, direct convolution and its adjoints) computed in Double.

// MARK: - Test data

/// A tensor of uniform values in [-1, 1).
func uniformTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    var rng = SplitMix64(state: seed)
    return Tensor(shape: shape, scalars: (0..<shape.product).map { _ in rng.signedUnit() })
}

/// A tensor of small integers in -8...8, for tests that expect exact results.
func integerTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    var rng = SplitMix64(state: seed)
    return Tensor(shape: shape, scalars: (0..<shape.product).map { _ in rng.smallInteger() })
}

/// A tensor whose element at flat position i is i (every element distinct).
func iotaTensor(_ shape: [Int]) -> Tensor {
    Tensor(shape: shape, scalars: (0..<shape.product).map(Float.init))
}

// MARK: - Index arithmetic

enum RowMajor {
    /// Row-major flat offset of `index` in `shape`, computed from scratch.
    static func offset(_ index: [Int], in shape: [Int]) -> Int {
        precondition(index.count == shape.count)
        var flat = 0
        for axis in shape.indices {
            precondition(index[axis] >= 0 && index[axis] < shape[axis])
            flat = flat * shape[axis] + index[axis]
        }
        return flat
    }

    /// Every multi-index of `shape`, in row-major order.
    static func all(_ shape: [Int]) -> [[Int]] {
        guard !shape.contains(0) else { return [] }
        var result: [[Int]] = []
        var index = [Int](repeating: 0, count: shape.count)
        while true {
            result.append(index)
            var axis = shape.count - 1
            while axis >= 0 {
                index[axis] += 1
                if index[axis] < shape[axis] { break }
                index[axis] = 0
                axis -= 1
            }
            if axis < 0 { return result }
        }
    }
}

extension Tensor {
    /// The element at a multi-index, through the from-scratch offset.
    subscript(at index: [Int]) -> Float { scalars[RowMajor.offset(index, in: shape)] }
}

// MARK: - Comparisons

/// max|actual − expected| / max|expected|: the error relative to the expected values' scale.
func relativeError(_ actual: [Float], _ expected: [Double]) -> Double {
    precondition(actual.count == expected.count, "\(actual.count) values vs \(expected.count) expected")
    var worst = 0.0
    var scale = 0.0
    for i in actual.indices {
        worst = max(worst, abs(Double(actual[i]) - expected[i]))
        scale = max(scale, abs(expected[i]))
    }
    return scale > 0 ? worst / scale : worst
}

/// Σ a·b accumulated in Double (independent of `Tensor.dot`).
func naiveDot(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    var total = 0.0
    for i in a.indices { total += Double(a[i]) * Double(b[i]) }
    return total
}

/// ‖a‖₂ in Double.
func naiveNorm(_ a: [Float]) -> Double { naiveDot(a, a).squareRoot() }

// MARK: - Matrix product

enum NaiveMatrix {
    /// α · op(A) · op(B) + β · C by the triple loop in Double. `a`, `b`, `c` are row-major
    /// as stored (before any transpose).
    static func gemm(
        _ a: Tensor, transposeA: Bool, _ b: Tensor, transposeB: Bool,
        alpha: Double, beta: Double, c: Tensor
    ) -> [Double] {
        let m = c.shape[0], n = c.shape[1]
        let k = transposeA ? a.shape[0] : a.shape[1]
        func opA(_ i: Int, _ p: Int) -> Double {
            Double(transposeA ? a.scalars[p * a.shape[1] + i] : a.scalars[i * a.shape[1] + p])
        }
        func opB(_ p: Int, _ j: Int) -> Double {
            Double(transposeB ? b.scalars[j * b.shape[1] + p] : b.scalars[p * b.shape[1] + j])
        }
        var result = [Double](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var total = 0.0
                for p in 0..<k { total += opA(i, p) * opB(p, j) }
                result[i * n + j] = alpha * total + beta * Double(c.scalars[i * n + j])
            }
        }
        return result
    }
}

// MARK: - Direct convolution

/// Direct convolution in Double with torch.nn.Conv1d/Conv2d/Conv3d semantics (one loop per
/// axis: n, o, the output positions, c and the kernel taps), and the gradients by the
/// same loops. Independent of the library's im2col and of `ConvGeometry.outputSize`.
enum NaiveConv {
    /// ⌊(size + 2p − d·(k − 1) − 1) / s⌋ + 1 with true floor division.
    static func outputExtent(size: Int, kernel: Int, stride: Int, padding: Int, dilation: Int) -> Int {
        let numerator = size + 2 * padding - dilation * (kernel - 1) - 1
        let quotient = numerator >= 0 ? numerator / stride : -((-numerator + stride - 1) / stride)
        return quotient + 1
    }

    struct Layout {
        let batch, inChannels, outChannels: Int
        let groups, inPerGroup, outPerGroup: Int
        /// Per spatial axis.
        let size, outSize, kernel, stride, padding, dilation: [Int]

        init(_ g: ConvGeometry, inputShape: [Int]) {
            batch = inputShape[0]; inChannels = inputShape[1]
            size = Array(inputShape[2...])
            outChannels = g.outChannels
            groups = g.groups
            inPerGroup = g.inChannels / g.groups
            outPerGroup = g.outChannels / g.groups
            kernel = g.kernelSize; stride = g.stride; padding = g.padding; dilation = g.dilation
            outSize = size.indices.map { axis in
                NaiveConv.outputExtent(size: inputShape[2 + axis], kernel: g.kernelSize[axis], stride: g.stride[axis],
                                       padding: g.padding[axis], dilation: g.dilation[axis])
            }
        }

        var outputShape: [Int] { [batch, outChannels] + outSize }
        var weightShape: [Int] { [outChannels, inPerGroup] + kernel }

        /// Calls `body(outputIndex, inputIndex, weightIndex)` for every tap that lands
        /// inside the input: loops over n, o, every output position, c and every kernel tap.
        func forEachTap(_ body: (Int, Int, Int) -> Void) {
            let positions = RowMajor.all(outSize)
            let taps = RowMajor.all(kernel)
            for n in 0..<batch {
                for o in 0..<outChannels {
                    let group = o / outPerGroup
                    for position in positions {
                        let yi = RowMajor.offset([n, o] + position, in: outputShape)
                        for c in 0..<inPerGroup {
                            for tap in taps {
                                let source = position.indices.map { axis in
                                    position[axis] * stride[axis] - padding[axis] + tap[axis] * dilation[axis]
                                }
                                guard source.indices.allSatisfy({ source[$0] >= 0 && source[$0] < size[$0] }) else { continue }
                                body(yi, RowMajor.offset([n, group * inPerGroup + c] + source, in: [batch, inChannels] + size),
                                     RowMajor.offset([o, c] + tap, in: weightShape))
                            }
                        }
                    }
                }
            }
        }
    }

    static func forward(_ input: Tensor, weight: Tensor, geometry: ConvGeometry) -> (shape: [Int], values: [Double]) {
        let layout = Layout(geometry, inputShape: input.shape)
        var out = [Double](repeating: 0, count: layout.outputShape.product)
        layout.forEachTap { yi, xi, wi in out[yi] += Double(input.scalars[xi]) * Double(weight.scalars[wi]) }
        return (layout.outputShape, out)
    }

    static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: ConvGeometry, inputShape: [Int]) -> [Double] {
        let layout = Layout(geometry, inputShape: inputShape)
        var out = [Double](repeating: 0, count: inputShape.product)
        layout.forEachTap { yi, xi, wi in out[xi] += Double(gradOutput.scalars[yi]) * Double(weight.scalars[wi]) }
        return out
    }

    static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: ConvGeometry) -> (shape: [Int], values: [Double]) {
        let layout = Layout(geometry, inputShape: input.shape)
        var out = [Double](repeating: 0, count: layout.weightShape.product)
        layout.forEachTap { yi, xi, wi in out[wi] += Double(gradOutput.scalars[yi]) * Double(input.scalars[xi]) }
        return (layout.weightShape, out)
    }
}
