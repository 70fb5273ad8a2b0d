import LycorisCore
import Testing

// Shared oracles for the core tests: deterministic test data that does not come from the
// library's own RandomSource, row-major index arithmetic, and naive reference loops
// (matrix product, direct convolution and its adjoints) computed in Double.

// MARK: - Test data

/// SplitMix64: a tiny generator for test inputs, independent of `RandomSource`.
struct TestRNG {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) on a 2⁻²³ grid.
    mutating func signedUnit() -> Float { Float(next() >> 40) * 0x1p-23 - 1 }

    /// A small integer in -8...8 (products and sums of these are exact in Float).
    mutating func smallInteger() -> Float { Float(Int(next() % 17) - 8) }
}

/// A tensor of uniform values in [-1, 1).
func uniformTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    var rng = TestRNG(seed: seed)
    return Tensor(shape: shape, scalars: (0..<shape.product).map { _ in rng.signedUnit() })
}

/// A tensor of small integers in -8...8, for tests that expect exact results.
func integerTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    var rng = TestRNG(seed: seed)
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

/// Direct (7-loop) 2-D convolution in Double with torch.nn.Conv2d semantics, and the
/// gradients by the same loops. Independent of the library's im2col and of
/// `Conv2dGeometry.outputSize`.
enum NaiveConv {
    /// ⌊(size + 2p − d·(k − 1) − 1) / s⌋ + 1 with true floor division.
    static func outputExtent(size: Int, kernel: Int, stride: Int, padding: Int, dilation: Int) -> Int {
        let numerator = size + 2 * padding - dilation * (kernel - 1) - 1
        let quotient = numerator >= 0 ? numerator / stride : -((-numerator + stride - 1) / stride)
        return quotient + 1
    }

    struct Layout {
        let batch, inChannels, height, width: Int
        let outChannels, outHeight, outWidth: Int
        let groups, inPerGroup, outPerGroup: Int
        let kh, kw, sh, sw, ph, pw, dh, dw: Int

        init(_ g: Conv2dGeometry, inputShape: [Int]) {
            batch = inputShape[0]; inChannels = inputShape[1]; height = inputShape[2]; width = inputShape[3]
            outChannels = g.outChannels
            groups = g.groups
            inPerGroup = g.inChannels / g.groups
            outPerGroup = g.outChannels / g.groups
            kh = g.kernelSize[0]; kw = g.kernelSize[1]
            sh = g.stride[0]; sw = g.stride[1]
            ph = g.padding[0]; pw = g.padding[1]
            dh = g.dilation[0]; dw = g.dilation[1]
            outHeight = NaiveConv.outputExtent(size: height, kernel: kh, stride: sh, padding: ph, dilation: dh)
            outWidth = NaiveConv.outputExtent(size: width, kernel: kw, stride: sw, padding: pw, dilation: dw)
        }

        var outputShape: [Int] { [batch, outChannels, outHeight, outWidth] }
        var weightShape: [Int] { [outChannels, inPerGroup, kh, kw] }

        func x(_ n: Int, _ c: Int, _ y: Int, _ x: Int) -> Int { ((n * inChannels + c) * height + y) * width + x }
        func y(_ n: Int, _ o: Int, _ y: Int, _ x: Int) -> Int { ((n * outChannels + o) * outHeight + y) * outWidth + x }
        func w(_ o: Int, _ c: Int, _ i: Int, _ j: Int) -> Int { ((o * inPerGroup + c) * kh + i) * kw + j }

        /// Calls `body(outputIndex, inputIndex, weightIndex)` for every tap that lands
        /// inside the input: the seven loops n, o, oy, ox, c, i, j.
        func forEachTap(_ body: (Int, Int, Int) -> Void) {
            for n in 0..<batch {
                for o in 0..<outChannels {
                    let group = o / outPerGroup
                    for oy in 0..<outHeight {
                        for ox in 0..<outWidth {
                            for c in 0..<inPerGroup {
                                for i in 0..<kh {
                                    let iy = oy * sh - ph + i * dh
                                    guard iy >= 0 && iy < height else { continue }
                                    for j in 0..<kw {
                                        let ix = ox * sw - pw + j * dw
                                        guard ix >= 0 && ix < width else { continue }
                                        body(y(n, o, oy, ox), x(n, group * inPerGroup + c, iy, ix), w(o, c, i, j))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    static func forward(_ input: Tensor, weight: Tensor, geometry: Conv2dGeometry) -> (shape: [Int], values: [Double]) {
        let layout = Layout(geometry, inputShape: input.shape)
        var out = [Double](repeating: 0, count: layout.outputShape.product)
        layout.forEachTap { yi, xi, wi in out[yi] += Double(input.scalars[xi]) * Double(weight.scalars[wi]) }
        return (layout.outputShape, out)
    }

    static func backwardInput(_ gradOutput: Tensor, weight: Tensor, geometry: Conv2dGeometry, inputShape: [Int]) -> [Double] {
        let layout = Layout(geometry, inputShape: inputShape)
        var out = [Double](repeating: 0, count: inputShape.product)
        layout.forEachTap { yi, xi, wi in out[xi] += Double(gradOutput.scalars[yi]) * Double(weight.scalars[wi]) }
        return out
    }

    static func backwardWeight(_ input: Tensor, gradOutput: Tensor, geometry: Conv2dGeometry) -> (shape: [Int], values: [Double]) {
        let layout = Layout(geometry, inputShape: input.shape)
        var out = [Double](repeating: 0, count: layout.weightShape.product)
        layout.forEachTap { yi, xi, wi in out[wi] += Double(gradOutput.scalars[yi]) * Double(input.scalars[xi]) }
        return (layout.weightShape, out)
    }
}
