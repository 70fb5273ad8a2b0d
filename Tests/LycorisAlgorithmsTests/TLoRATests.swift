import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// T-LoRA beyond the fixtures: the SVD initialisation's defining properties, the conv
/// kernels LyCORIS 4.1.3 crashes on, the timestep mask, and files (which do not store the
/// frozen factors).
@Suite("T-LoRA")
struct TLoRATests {
    static let conv3x3 = LayerSpec.convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3], padding: [1, 1]))

    func adapter(_ layer: LayerSpec, _ options: AdapterOptions, base: Tensor) throws -> TLoRA {
        var random = RandomSource(seed: 5)
        return try #require(try Algorithm.tlora.makeAdapter(layer: layer, options: options, random: &random, baseWeight: base) as? TLoRA)
    }

    func maxAbs(_ t: Tensor) -> Float { t.scalars.map(abs).max() ?? 0 }

    func identity(_ n: Int) -> Tensor { Tensor(shape: [n, n], scalars: (0..<(n * n)).map { $0 % (n + 1) == 0 ? 1 : 0 }) }

    /// diag(d)·m for m (k, n).
    func scaledRows(_ m: Tensor, _ d: Tensor) -> Tensor {
        let n = m.shape[1]
        return Tensor(shape: m.shape, scalars: m.scalars.enumerated().map { $1 * d.scalars[$0 / n] })
    }

    @Test("double-precision SVD: U·diag(S)·Vᵀ rebuilds A, U and V orthonormal, S descending (tall and wide)")
    func singularValueDecomposition() throws {
        for shape in [[7, 5], [5, 7]] {
            let a = randomTensor(shape, seed: UInt64(shape[0]))
            let svd = try a.doublePrecisionSingularValueDecomposition()
            let k = min(shape[0], shape[1])
            expectClose(Tensor.matmul(svd.u, scaledRows(svd.vt, Tensor(shape: [k], scalars: svd.s))), a, "U·S·Vᵀ \(shape)")
            expectClose(Tensor.matmul(svd.u, transposeA: true, svd.u), identity(k), "UᵀU")
            expectClose(Tensor.matmul(svd.vt, svd.vt, transposeB: true), identity(k), "VᵀV")
            #expect(zip(svd.s, svd.s.dropFirst()).allSatisfy { $0 >= $1 })
        }
    }

    @Test("Init: ΔW = 0, P and Q orthonormal, P·diag(λ)·Q the rank-r truncation of W0 (conv 3x3: Q keeps the kernel)")
    func initialisation() throws {
        let base = randomTensor(Self.conv3x3.weightShape, seed: 11)
        let module = try adapter(Self.conv3x3, AdapterOptions(rank: 3, alpha: 2), base: base)
        #expect(module.parameters["q_layer.weight"]!.shape == [3, 4, 3, 3])
        #expect(module.parameters["p_layer.weight"]!.shape == [6, 3, 1, 1])
        #expect(maxAbs(try module.deltaWeight(DeltaContext())) == 0)
        let p = module.parameters["p_layer.weight"]!.flattenedToMatrix()
        let q = module.parameters["q_layer.weight"]!.flattenedToMatrix()
        let lambda = module.parameters["lambda_layer"]!.reshaped([3])
        expectClose(Tensor.matmul(p, transposeA: true, p), identity(3), "PᵀP")
        expectClose(Tensor.matmul(q, q, transposeB: true), identity(3), "QQᵀ")
        // The residual of the best rank-r approximation is orthogonal to both subspaces.
        let w = base.flattenedToMatrix()
        let residual = w - Tensor.matmul(p, scaledRows(q, lambda))
        #expect(maxAbs(Tensor.matmul(p, transposeA: true, residual)) < 1e-5)
        #expect(maxAbs(Tensor.matmul(residual, q, transposeB: true)) < 1e-5)
        // λᵢ = ‖W0ᵀ·pᵢ‖, descending.
        let projected = Tensor.matmul(p, transposeA: true, w)
        for i in 0..<3 {
            let norm = projected.scalars[(i * 36)..<((i + 1) * 36)].reduce(0) { $0 + $1 * $1 }.squareRoot()
            #expect(abs(norm - lambda.scalars[i]) < 1e-5 * lambda.scalars[0])
        }
    }

    @Test("use_data_init false: orthonormal factors of a random matrix, ΔW = 0")
    func randomInit() throws {
        var options = AdapterOptions(rank: 2, alpha: 1)
        options.useDataInit = false
        let module = try adapter(.linear(inFeatures: 6, outFeatures: 5), options, base: randomTensor([5, 6], seed: 2))
        let p = module.parameters["p_layer.weight"]!
        expectClose(Tensor.matmul(p, transposeA: true, p), identity(2), "PᵀP")
        #expect(maxAbs(try module.deltaWeight(DeltaContext())) == 0)
    }

    @Test("Timestep mask: a zero entry removes that rank from both terms; an all-zero mask gives ΔW = 0")
    func timestepMask() throws {
        let layer = LayerSpec.linear(inFeatures: 6, outFeatures: 5)
        var module = try adapter(layer, AdapterOptions(rank: 3, alpha: 3), base: randomTensor([5, 6], seed: 3))
        module.parameters["lambda_layer"] = randomTensor([1, 3], seed: 4)
        module.parameters["q_layer.weight"] = randomTensor([3, 6], seed: 6)
        let full = try module.deltaWeight(DeltaContext())
        #expect(maxAbs(full) > 0.1)
        #expect(maxAbs(try module.deltaWeight(DeltaContext(timestepMask: Tensor(shape: [3], scalars: [0, 0, 0])))) == 0)
        // The mask is cut to r or padded with 1s: [1, 1, 1, 0] is all ranks, [1] too.
        expectClose(try module.deltaWeight(DeltaContext(timestepMask: Tensor(shape: [4], scalars: [1, 1, 1, 0]))), full, "long mask")
        expectClose(try module.deltaWeight(DeltaContext(timestepMask: Tensor(shape: [1], scalars: [1]))), full, "short mask")
        let dropFirst = try module.deltaWeight(DeltaContext(timestepMask: Tensor(shape: [1], scalars: [0])))
        let onlyFirst = try module.deltaWeight(DeltaContext(timestepMask: Tensor(shape: [3], scalars: [1, 0, 0])))
        expectClose(dropFirst + onlyFirst, full, "ranks add up")
    }

    @Test("Files: saved tensors reload on the same W0 to the same ΔW (frozen factors from W0's SVD); no W0, an error")
    func fileRoundTrip() throws {
        let base = randomTensor(Self.conv3x3.weightShape, seed: 12)
        var module = try adapter(Self.conv3x3, AdapterOptions(rank: 2, alpha: 1.5), base: base)
        for (name, tensor) in module.parameters.entries { module.parameters[name] = tensor + randomTensor(tensor.shape, seed: 13, std: 0.1) }
        let saved = Dictionary(uniqueKeysWithValues: module.savedTensors().map { ($0.suffix, $0.tensor) })
        #expect(saved["alpha"]!.scalarValue == 1.5)
        let alpha = saved["alpha"]!.scalarValue
        let loaded = try Algorithm.tlora.loadAdapter(layer: Self.conv3x3, tensors: saved, alpha: alpha, baseWeight: base)
        expectClose(try loaded.deltaWeight(DeltaContext()), try module.deltaWeight(DeltaContext()), "reloaded ΔW")
        #expect(throws: AdapterError.self) {
            _ = try Algorithm.tlora.loadAdapter(layer: Self.conv3x3, tensors: saved, alpha: alpha)
        }
        // As in LyCORIS, a file does not say which components the frozen term came from: a
        // module started from the last singular vectors reloads with the principal ones.
        var options = AdapterOptions(rank: 2, alpha: 1.5)
        options.sigType = "last"
        var last = try adapter(Self.conv3x3, options, base: base)
        last.parameters = module.parameters
        let lastSaved = Dictionary(uniqueKeysWithValues: last.savedTensors().map { ($0.suffix, $0.tensor) })
        let reloaded = try Algorithm.tlora.loadAdapter(layer: Self.conv3x3, tensors: lastSaved, alpha: alpha, baseWeight: base)
        expectClose(try reloaded.deltaWeight(DeltaContext()), try module.deltaWeight(DeltaContext()), "reloaded with the principal term")
        #expect(throws: AdapterError.self) {
            var random = RandomSource(seed: 0)
            _ = try Algorithm.tlora.makeAdapter(layer: Self.conv3x3, options: AdapterOptions(), random: &random)
        }
    }
}
