import Foundation
import LycorisAlgorithms
import LycorisCore

/// Time of the device weight path per layer: one ``DeviceAdapterMath/deltaWeight(of:parameters:multiplier:baseWeight:block:rowMask:into:bias:)``
/// plus one ``DeviceAdapterMath/deltaWeightBackward(of:parameters:multiplier:baseWeight:block:rowMask:gradient:biasGradient:into:)``,
/// then ``DeviceAdapterMath/synchronize()`` — what a training step costs the server per
/// adapted layer on a device — on SD 1.5's layer shapes, median of the timed repeats, with
/// the workspace each layer needs. `lycoris-server --device-bench cuda:0` prints it
/// (scripts/gpu-check.sh). NO FIGURE EXISTS YET: it has not run on a GPU.
public enum DeviceTiming {
    public struct Row: Sendable {
        public let name: String
        let algorithm: Algorithm
        let layer: LayerSpec
        let options: AdapterOptions

        init(_ name: String, _ algorithm: Algorithm, _ layer: LayerSpec, _ configure: (inout AdapterOptions) -> Void = { _ in }) {
            var options = AdapterOptions(rank: 8, alpha: 4)
            configure(&options)
            (self.name, self.algorithm, self.layer, self.options) = (name, algorithm, layer, options)
        }
    }

    /// SD 1.5's adapted shapes (attention projections, the GEGLU feed-forward, 3×3 convolutions)
    /// with LoRA, LoHa and LoKr.
    public static let sd15: [Row] = {
        let shapes: [(String, LayerSpec)] = [
            ("linear 320x320", .linear(inFeatures: 320, outFeatures: 320)),
            ("linear 1280x1280", .linear(inFeatures: 1280, outFeatures: 1280)),
            ("linear 1280->10240", .linear(inFeatures: 1280, outFeatures: 10240)),
            ("conv3x3 320", .convolution(ConvGeometry(inChannels: 320, outChannels: 320, kernelSize: [3, 3], padding: [1, 1]))),
            ("conv3x3 1280", .convolution(ConvGeometry(inChannels: 1280, outChannels: 1280, kernelSize: [3, 3], padding: [1, 1]))),
        ]
        return shapes.flatMap { name, layer in
            [Row("lora " + name, .locon, layer), Row("loha " + name, .loha, layer),
             Row("lokr " + name, .lokr, layer) { $0.factor = 16 }]
        }
    }()

    /// (median milliseconds, workspace bytes) of `row` on `runtime` over `repeats` timed runs.
    public static func measure(_ row: Row, on runtime: DeviceRuntime, warmup: Int = 2,
                               repeats: Int = 10) throws -> (milliseconds: Double, workspaceBytes: Int) {
        var random = RandomSource(seed: 1)
        var algorithm = try row.algorithm.makeAdapter(layer: row.layer, options: row.options, random: &random)
        algorithm.parameters = ParameterSet(algorithm.parameters.entries.map { ($0.name, Tensor.normal($0.tensor.shape, std: 0.1, using: &random)) })
        let module = AdapterModule(name: row.name, algorithm: algorithm, options: row.options)
        let memory = DeviceSelfCheck.Uploads(runtime)
        defer { memory.freeAll() }
        let parameters = try memory.upload(algorithm.parameters)
        let gradients = try memory.unwritten(like: algorithm.parameters)
        let output = try memory.unwritten(row.layer.weightShape)
        let gradient = try memory.upload(.normal(row.layer.weightShape, std: 1, using: &random))
        let math = DeviceAdapterMath(runtime: runtime)
        let clock = ContinuousClock()
        var times: [Double] = []
        for iteration in 0..<(warmup + repeats) {
            let started = clock.now
            try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, into: output)
            try math.deltaWeightBackward(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, gradient: gradient,
                                         into: gradients)
            try math.synchronize()
            let elapsed = (clock.now - started).components
            if iteration >= warmup { times.append(Double(elapsed.seconds) * 1e3 + Double(elapsed.attoseconds) * 1e-15) }
        }
        return (times.sorted()[times.count / 2], math.workspaceBytes)
    }

    /// Every row of `rows` on `runtime`, one line each (≤ 100 columns); false when one failed.
    public static func report(_ rows: [Row] = sd15, on runtime: DeviceRuntime, repeats: Int = 10,
                              write: (String) -> Void) -> Bool {
        write("device weight path on \(runtime.description): ΔW + backward + synchronize per layer, median of \(repeats)")
        var passed = true
        for row in rows {
            let name = row.name.padding(toLength: 28, withPad: " ", startingAt: 0)
            do {
                let (milliseconds, bytes) = try measure(row, on: runtime, repeats: repeats)
                write(name + String(format: " %9.3f ms   workspace %8.2f MiB", milliseconds, Double(bytes) / 1_048_576))
            } catch {
                passed = false
                write(name + " FAILED: \(error)")
            }
        }
        return passed
    }
}
