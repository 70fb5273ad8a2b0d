// layer-bench — goal (a) of bench/layers.py: one adapter's forward + backward in this engine,
// in-process (no server, no transport), timed per iteration.
//
//     layer-bench --threads N
//
// Reads one case per line on stdin, JSON:
//     {"key": "...", "algo": "locon"|"loha"|"lokr"|"ia3"|"dylora",
//      "layer": {"kind": "linear"|"conv2d", "in": C, "out": O, "kernel": k, "padding": p},
//      "input": [N, …], "options": {AdapterOptions' wire names: "rank", "alpha", "factor", …},
//      "iters": K, "warmup": W}
// and answers each with one line {"key": "...", "ms": [K timings]}. One iteration is what the
// server computes for an adapted layer on the activation transfer: m·Δ(x) = forwardDelta(x)
// (training mode, tape drawn) and backwardDelta(x, ∂y) → (∂x, ∂parameters) — or, for a module
// with an elementwise transfer (IA3), forwardElementwise/backwardElementwise of the tensor it
// scales (DoRA on the output axis: of the base output y with x); x, y and ∂y are made once, outside the timed region. A bad case answers
// {"key", "error"} and the loop goes on.
import CMalloc
import Foundation
import LycorisAlgorithms
import LycorisCore

struct LayerCase: Decodable {
    var kind: String
    var `in`: Int
    var out: Int
    var kernel: Int?
    var padding: Int?

    var spec: LayerSpec {
        guard kind != "linear" else { return .linear(inFeatures: `in`, outFeatures: out) }
        let k = kernel ?? 1
        let p = padding ?? 0
        return .convolution(ConvGeometry(inChannels: `in`, outChannels: out, kernelSize: [k, k], padding: [p, p]))
    }
}

struct BenchCase: Decodable {
    var key: String
    var algo: String
    var layer: LayerCase
    var input: [Int]
    var options: AdapterOptions
    var iters: Int
    var warmup: Int?
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
}

/// Milliseconds of each timed forward + backward of `bench`'s adapter.
func measure(_ bench: BenchCase) throws -> [Double] {
    guard let algorithm = Algorithm(rawValue: bench.algo) else { throw BenchError(description: "unknown algo \(bench.algo)") }
    let spec = bench.layer.spec
    if let problem = spec.inputProblem(bench.input) { throw BenchError(description: problem) }
    var random = RandomSource(seed: 0)
    let weight = Tensor.normal(spec.weightShape, std: 0.02, using: &random)
    // (W0 too: DoRA's magnitude starts from ‖W0‖ and its ΔW reads W0.)
    let adapter = try algorithm.makeAdapter(layer: spec, options: bench.options, random: &random, baseWeight: weight)
    var module = AdapterModule(name: bench.key, algorithm: adapter, options: bench.options, baseWeight: weight)
    module.isTraining = true
    let x = Tensor.normal(bench.input, std: 1, using: &random)
    let gradOutput = Tensor.normal(spec.outputShape(forInput: bench.input), std: 1, using: &random)
    // The elementwise transfer (IA3, DoRA) scales the base output y (or x); y is made once here.
    let base = module.elementwiseSide == .output || module.elementwiseSide == .outputWithInput ? Tensor.normal(gradOutput.shape, std: 1, using: &random) : gradOutput
    var timings: [Double] = []
    for iteration in 0..<(bench.warmup ?? 1) + bench.iters {
        let start = DispatchTime.now().uptimeNanoseconds
        let tape = module.makeTape(inputShape: x.shape, random: &random)
        let y: Tensor
        let gradInput: Tensor, gradients: ParameterSet
        switch module.elementwiseSide {
        case .output?:
            y = try module.forwardElementwise(base, tape: tape)
            (gradInput, gradients) = try module.backwardElementwise(base, gradOutput: gradOutput, tape: tape)
        case .outputWithInput?:
            let saved: Tensor
            (y, saved) = try module.forwardElementwise(base, layerInput: x, tape: tape)
            let grads = try module.backwardElementwise(saved: saved, layerInput: x, gradOutput: gradOutput, tape: tape)
            (gradInput, gradients) = (grads.layerInput, grads.parameters)
        case .input?:
            y = try module.forwardElementwise(x, tape: tape)
            (gradInput, gradients) = try module.backwardElementwise(x, gradOutput: x, tape: tape)
        case nil:
            y = try module.forwardDelta(x, tape: tape)
            (gradInput, gradients) = try module.backwardDelta(x, gradOutput: gradOutput, tape: tape)
        }
        let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
        // Keep the results alive to the end of the timed region.
        precondition(!y.shape.isEmpty && !gradInput.shape.isEmpty && gradients.count > 0)
        if iteration >= bench.warmup ?? 1 { timings.append(elapsed) }
    }
    return timings
}

func reply(_ object: [String: Any]) {
    let data = try! JSONSerialization.data(withJSONObject: object)
    FileHandle.standardOutput.write(data + Data("\n".utf8))
}

let arguments = CommandLine.arguments
if let index = arguments.firstIndex(of: "--threads"), index + 1 < arguments.count, let threads = Int(arguments[index + 1]) {
    BLASThreads.set(threads)
}
// The server's allocator settings (Sources/lycoris-server): freed blocks stay in the heap, so
// a step's buffers do not fault in fresh pages every iteration.
mallopt(M_MMAP_MAX, 0)
mallopt(M_TRIM_THRESHOLD, Int32.max)
while let line = readLine() {
    guard !line.trimmingCharacters(in: .whitespaces).isEmpty else { continue }
    var key = "?"
    do {
        let bench = try JSONDecoder().decode(BenchCase.self, from: Data(line.utf8))
        key = bench.key
        reply(["key": key, "ms": try measure(bench)])
    } catch {
        reply(["key": key, "error": "\(error)"])
    }
}
