import ArgumentParser
import Foundation
import LycorisAlgorithms
import LycorisCore

/// `lycoris demo`: trains an adapter on a small built-in model with synthetic data — no
/// downloads — and writes a kohya-named `.safetensors` file.
///
/// Each layer has a frozen base weight W0 and a "teacher" W* = W0 + ΔW of a hidden adapter
/// of the same algorithm with random parameters; the trained adapter learns to reproduce
/// the teacher's outputs on random inputs (MSE, AdamW), so the loss falls as it finds ΔW.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "demo", abstract: "Train an adapter on a built-in toy model and save it.")

    @Option(help: "Algorithm: locon, loha, lokr, ia3 or dylora.") var algo: String = "loha"
    @Option(help: "Training steps.") var steps: Int = 300
    @Option(help: "Learning rate.") var learningRate: Float = 1e-2
    @Option(help: "Output file.") var out: String = "demo-adapter.safetensors"
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @Option(help: "OpenBLAS threads.") var threads: Int = 2

    /// The toy model: kohya-named layers with SD-like roles at small sizes.
    static let layers: [(name: String, spec: LayerSpec)] = [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", .linear(inFeatures: 64, outFeatures: 64)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", .linear(inFeatures: 64, outFeatures: 64)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", .linear(inFeatures: 256, outFeatures: 64)),
        ("lora_unet_down_blocks_0_resnets_0_conv1", .convolution(ConvGeometry(inChannels: 16, outChannels: 16, kernelSize: [3, 3], padding: [1, 1]))),
    ]

    func run() throws {
        guard let algorithm = Algorithm(rawValue: algo), algorithm.isComputed else {
            throw ValidationError("unknown algorithm '\(algo)'; choose one of \(Algorithm.allCases.filter(\.isComputed).map(\.rawValue).joined(separator: ", "))")
        }
        guard steps > 0 else { throw ValidationError("--steps must be positive") }
        BLASThreads.set(threads)
        var random = RandomSource(seed: seed)
        var options = AdapterOptions(rank: 8, alpha: 4)
        options.blockSize = 2
        var network = Network()
        var teachers: [String: Tensor] = [:]
        for (name, spec) in Self.layers {
            let base = Tensor.normal(spec.weightShape, std: 0.2, using: &random)
            var hidden = try algorithm.makeAdapter(layer: spec, options: options, random: &random, baseWeight: base)
            for (parameter, value) in hidden.parameters.entries {
                hidden.parameters[parameter] = .normal(value.shape, std: 0.3, using: &random)
            }
            teachers[name] = base + (try hidden.deltaWeight(DeltaContext(baseWeight: base)))
            let adapter = try algorithm.makeAdapter(layer: spec, options: options, random: &random, baseWeight: base)
            try network.add(AdapterModule(name: name, algorithm: adapter, options: options, baseWeight: base))
        }
        network.setTraining(true)
        var optimizer = Optimizer(kind: .adamw)
        print("training \(algorithm.rawValue) on \(Self.layers.count) layers (\(network.parameterCount) parameters), \(steps) steps")
        let start = Date()
        var losses: [Float] = []
        for step in 1...steps {
            optimizer.beginStep()
            var loss: Float = 0
            for var module in network.modules {
                let spec = module.layer
                let inputShape = spec.isConvolution ? [2, spec.inputChannels, 8, 8] : [16, spec.inputChannels]
                let x = Tensor.normal(inputShape, std: 1, using: &random)
                let tape = module.makeTape(inputShape: inputShape, random: &random)
                let y = try module.forward(x, tape: tape)
                let target = spec.apply(x, weight: teachers[module.name]!)
                let residual = y - target
                loss += residual.dot(residual) / Float(residual.count)
                let grads = try module.backward(x, gradOutput: residual * (2 / Float(residual.count)), tape: tape)
                for (parameter, gradient) in grads.parameters.entries {
                    var value = module.algorithm.parameters.required(parameter)
                    optimizer.update(key: "\(module.name).\(parameter)", value: &value, gradient: gradient,
                                     learningRate: learningRate, weightDecay: 0)
                    module.algorithm.parameters[parameter] = value
                }
                network[module.name] = module
            }
            losses.append(loss / Float(Self.layers.count))
            if step == 1 || step % max(1, steps / 10) == 0 || step == steps {
                let rate = Double(step) / max(Date().timeIntervalSince(start), 1e-9)
                print(String(format: "step %4d/%d  loss %.5f  %.1f steps/s", step, steps, losses.last!, rate))
            }
        }
        network.setTraining(false)
        let metadata = ["ss_network_module": "swift_lycoris", "ss_network_args": "{\"algo\": \"\(algorithm.rawValue)\"}",
                        "ss_network_dim": "\(options.rank)", "ss_network_alpha": "\(options.alpha ?? 0)",
                        "ss_steps": "\(steps)", "ss_training_comment": "lycoris demo: synthetic low-rank regression"]
        try network.save(toPath: out, dtype: .f32, metadata: metadata)
        print(String(format: "loss %.5f → %.5f; saved ", losses.first!, losses.last!) + out)
        print(InfoCommand.table(try AdapterFile(path: out)))
    }
}
