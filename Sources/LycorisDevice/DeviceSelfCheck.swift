import Foundation
import LycorisAlgorithms
import LycorisCore

/// The device backend against the host engine, case by case: for each ported algorithm ×
/// layer kind × option set, a module with seeded random parameters (none zero, σ ≠ 0), a
/// multiplier ≠ 1, and the same inputs uploaded to a ``DeviceRuntime``:
///
///     m·ΔW (and m·Δb)    DeviceAdapterMath.deltaWeight      vs AdapterModule.effectiveDeltaWeight(Bias)
///     ∂parameters        DeviceAdapterMath.deltaWeightBackward vs AdapterModule.effectiveDeltaWeightBackward
///
/// each as max|device − host| / max|host|. The Swift tests run it on ``EmulatedDevice`` (CI);
/// `lycoris-server --device-check cuda:0` runs it on ``CUDADevice`` (scripts/gpu-check.sh), so
/// a GPU session checks the real device in one call. NOT YET RUN ON A GPU.
public enum DeviceSelfCheck {
    /// The tolerance of every comparison (float32 on both sides; only rounding order differs).
    public static let tolerance: Float = 1e-5

    public struct Case: Sendable, CustomStringConvertible {
        public let name: String
        let algorithm: Algorithm
        let layer: LayerSpec
        let options: AdapterOptions
        let hasBias: Bool
        let multiplier: Float
        let block: Int?
        let rowMask: Bool

        init(_ name: String, _ algorithm: Algorithm, _ layer: LayerSpec, multiplier: Float = 0.7, hasBias: Bool = false,
             block: Int? = nil, rowMask: Bool = false, _ configure: (inout AdapterOptions) -> Void = { _ in }) {
            var options = AdapterOptions(rank: 4, alpha: 2)
            configure(&options)
            (self.name, self.algorithm, self.layer, self.options) = (name, algorithm, layer, options)
            (self.hasBias, self.multiplier, self.block, self.rowMask) = (hasBias, multiplier, block, rowMask)
        }

        public var description: String { name }
    }

    /// One compared tensor: `what` (ΔW, Δb or a parameter's suffix) and its relative error.
    public struct Comparison: Sendable {
        public let what: String
        public let error: Float
        /// max|host|: a comparison against zeros would prove nothing.
        public let scale: Float
    }

    static let linear = LayerSpec.linear(inFeatures: 24, outFeatures: 20)
    static let conv = LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], padding: [1, 1]))

    /// Every ported algorithm on linear and convolution layers with its factor forms and options.
    public static let cases: [Case] = [
        Case("locon linear", .locon, linear),
        Case("locon linear use_scalar rs_lora", .locon, linear) { $0.useScalar = true; $0.rsLoRA = true },
        Case("locon linear rank-dropout rows", .locon, linear, rowMask: true),
        Case("locon conv2d 3x3", .locon, conv),
        Case("locon conv2d tucker", .locon, conv) { $0.useTucker = true },
        Case("locon conv2d tucker use_scalar", .locon, conv, multiplier: -1.3) { $0.useTucker = true; $0.useScalar = true },
        Case("locon conv1d groups 2", .locon,
             .convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [5], groups: 2))),
        Case("locon conv3d 3x1x3", .locon, .convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 1, 3]))),
        Case("loha linear", .loha, linear),
        Case("loha conv2d 3x3 use_scalar", .loha, conv) { $0.useScalar = true },
        Case("loha conv2d tucker", .loha, conv, multiplier: -1.3) { $0.useTucker = true },
        Case("lokr linear w1, w2 full", .lokr, linear) { $0.rank = 16 },
        Case("lokr linear w1_a·w1_b, w2_a·w2_b", .lokr, .linear(inFeatures: 64, outFeatures: 48)) {
            $0.rank = 2; $0.decomposeBoth = true; $0.factor = 8
        },
        Case("lokr conv2d w2_a·w2_b", .lokr, .convolution(ConvGeometry(inChannels: 16, outChannels: 24, kernelSize: [3, 3]))) {
            $0.rank = 2
        },
        Case("lokr conv2d tucker t2 use_scalar", .lokr,
             .convolution(ConvGeometry(inChannels: 16, outChannels: 24, kernelSize: [3, 3]))) {
            $0.rank = 2; $0.useTucker = true; $0.useScalar = true
        },
        Case("lokr conv2d full_matrix unbalanced", .lokr, conv) { $0.fullMatrix = true; $0.unbalancedFactorization = true },
        Case("dylora linear block 1", .dylora, linear, block: 1) { $0.rank = 6; $0.blockSize = 2 },
        Case("dylora conv2d all blocks", .dylora, conv) { $0.rank = 6; $0.blockSize = 2 },
        Case("glora linear", .glora, linear),
        Case("glora conv2d use_scalar", .glora, conv, multiplier: -1.3) { $0.useScalar = true },
        Case("ia3 linear", .ia3, linear),
        Case("ia3 linear on_input", .ia3, linear) { $0.trainOnInput = true },
        Case("ia3 conv2d", .ia3, conv, rowMask: true),
        Case("ia3 conv2d on_input", .ia3, conv) { $0.trainOnInput = true },
        Case("full linear with bias", .full, linear, hasBias: true),
        Case("full conv2d rank-dropout rows", .full, conv, rowMask: true),
        Case("norm layer_norm with bias", .norms, .norm(Normalization(kind: .layer(normalizedShape: [2, 6])))),
        Case("norm group_norm without bias", .norms,
             .norm(Normalization(kind: .group(groups: 2, channels: 8), hasBias: false))),
    ]

    /// Runs `check` on `runtime`: every comparison, or the error that stopped it.
    public static func run(_ check: Case, on runtime: DeviceRuntime) throws -> [Comparison] {
        var random = RandomSource(seed: 0x5EED &+ UInt64(check.name.utf8.reduce(0) { $0 &* 31 &+ Int($1) } & 0xFFFF))
        let baseWeight = Tensor.normal(check.layer.weightShape, std: 0.5, using: &random)
        var algorithm = try check.algorithm.makeAdapter(layer: check.layer, options: check.options, random: &random,
                                                        baseWeight: baseWeight, hasBias: check.hasBias)
        algorithm.parameters = ParameterSet(algorithm.parameters.entries.map {
            ($0.name, $0.name == "scalar" ? Tensor(scalar: 0.8) : Tensor.normal($0.tensor.shape, std: 0.5, using: &random))
        })
        var module = AdapterModule(name: check.name, algorithm: algorithm, options: check.options, baseWeight: baseWeight)
        module.multiplier = check.multiplier
        var unused = RandomSource(seed: 0)
        var tape = module.makeTape(inputShape: [], random: &unused)
        tape.context.block = check.block
        if check.rowMask {
            tape.rowMask = Tensor(shape: [check.layer.outFeatures],
                                  scalars: (0..<check.layer.outFeatures).map { $0 % 3 == 1 ? 0 : 1.5 })
        }
        let gradient = Tensor.normal(check.layer.weightShape, std: 1, using: &random)
        let biasGradient = algorithm.adaptsBias ? Tensor.normal(check.layer.biasShape, std: 1, using: &random) : nil
        let expectedDelta = try module.effectiveDeltaWeight(tape)
        let expectedBias = try module.effectiveDeltaBias(tape)
        let expectedGradients = try module.effectiveDeltaWeightBackward(gradient, biasGradient: biasGradient, tape)

        let memory = Uploads(runtime)
        defer { memory.freeAll() }
        let parameters = try memory.upload(algorithm.parameters)
        // Outputs start as NaN: an element the device does not write fails the comparison.
        let output = try memory.unwritten(check.layer.weightShape)
        let bias = try expectedBias.map { try memory.unwritten($0.shape) }
        let math = DeviceAdapterMath(runtime: runtime)
        let base = try memory.upload(baseWeight)
        let mask = try tape.rowMask.map { try memory.upload($0) }
        try math.deltaWeight(of: module, parameters: parameters, multiplier: check.multiplier, baseWeight: base,
                             block: check.block, rowMask: mask, into: output, bias: bias)
        let gradients = try memory.unwritten(like: algorithm.parameters)
        try math.deltaWeightBackward(of: module, parameters: parameters, multiplier: check.multiplier, baseWeight: base,
                                     block: check.block, rowMask: mask, gradient: try memory.upload(gradient),
                                     biasGradient: try biasGradient.map { try memory.upload($0) }, into: gradients)
        try math.synchronize()
        var comparisons = [try compare("m·ΔW", memory.download(output), expectedDelta)]
        if let bias, let expectedBias { comparisons.append(try compare("m·Δb", memory.download(bias), expectedBias)) }
        for (name, expected) in expectedGradients.entries {
            comparisons.append(try compare("∂" + name, memory.download(gradients[name]!), expected))
        }
        return comparisons
    }

    private static func compare(_ what: String, _ actual: Tensor, _ expected: Tensor) throws -> Comparison {
        guard actual.count == expected.count else {
            throw DeviceRuntimeError("\(what): \(actual.count) elements, the host has \(expected.count)")
        }
        var worst: Float = 0
        for i in actual.scalars.indices {
            let difference = abs(actual.scalars[i] - expected.scalars[i])
            worst = difference.isNaN ? .nan : max(worst, difference)
        }
        let scale = expected.maxAbs
        return Comparison(what: what, error: scale > 0 ? worst / scale : worst, scale: scale)
    }

    /// Device copies of host tensors, freed together.
    final class Uploads {
        let runtime: DeviceRuntime
        private var addresses: [UInt64] = []

        init(_ runtime: DeviceRuntime) { self.runtime = runtime }

        func upload(_ tensor: Tensor) throws -> DeviceTensor {
            let address = try runtime.allocate(tensor.count)
            addresses.append(address)
            try runtime.write(tensor.scalars, to: address)
            return DeviceTensor(address: address, shape: tensor.shape)
        }

        func upload(_ parameters: ParameterSet) throws -> [String: DeviceTensor] {
            var tensors: [String: DeviceTensor] = [:]
            for (name, tensor) in parameters.entries { tensors[name] = try upload(tensor) }
            return tensors
        }

        /// A buffer of NaNs.
        func unwritten(_ shape: [Int]) throws -> DeviceTensor { try upload(Tensor(repeating: .nan, shape: shape)) }

        func unwritten(like parameters: ParameterSet) throws -> [String: DeviceTensor] {
            try upload(ParameterSet(parameters.entries.map { ($0.name, Tensor(repeating: .nan, shape: $0.tensor.shape)) }))
        }

        func download(_ tensor: DeviceTensor) throws -> Tensor {
            Tensor(shape: tensor.shape, scalars: try runtime.read(tensor.address, count: tensor.count))
        }

        func freeAll() {
            try? runtime.synchronize()
            for address in addresses { try? runtime.free(address) }
            addresses = []
        }
    }
}

extension DeviceSelfCheck {
    /// Runs every case on `runtime`, writing one line per case (name, the worst comparison,
    /// its relative error, ok/FAILED; ≤ 100 columns) and a summary; true when all passed.
    public static func report(on runtime: DeviceRuntime, write: (String) -> Void) -> Bool {
        write("device check on \(runtime.description): \(cases.count) cases, m·ΔW and ∂parameters against the host engine, "
            + "tolerance \(tolerance) relative")
        var failed = 0
        let clock = ContinuousClock()
        let started = clock.now
        for check in cases {
            let line = check.name.padding(toLength: 40, withPad: " ", startingAt: 0)
            do {
                let comparisons = try run(check, on: runtime)
                // NaN (an element never written, or a non-finite result) counts as the worst.
                let worst = comparisons.max { $0.error < $1.error || ($1.error.isNaN && !$0.error.isNaN) }!
                let passed = comparisons.allSatisfy { $0.error <= tolerance }
                if !passed { failed += 1 }
                write(line + " worst " + worst.what.padding(toLength: 20, withPad: " ", startingAt: 0)
                    + " \(String(format: "%.2e", Double(worst.error)))  " + (passed ? "ok" : "FAILED"))
            } catch {
                failed += 1
                write(line + " FAILED: \(error)")
            }
        }
        let elapsed = (clock.now - started).components
        let seconds = Double(elapsed.seconds) + Double(elapsed.attoseconds) * 1e-18
        write("device check: \(cases.count - failed) of \(cases.count) cases passed in \(String(format: "%.2f", seconds)) s")
        return failed == 0
    }
}
