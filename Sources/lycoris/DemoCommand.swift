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

    @Option(help: "Algorithm: \(Self.algorithmNames.joined(separator: ", ")) (the names of `make demo ALGO=`, the kohya module and the server).")
    var algo: String = "loha"
    @Option(parsing: .unconditional, help: "Training steps.") var steps: Int = 300
    @Option(parsing: .unconditional, help: "Learning rate.") var learningRate: Float = 1e-2
    @Option(help: "Output file (`make demo` writes demo-adapter.safetensors; this one differs so neither overwrites the other).")
    var out: String = "lycoris-demo-adapter.safetensors"
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @Option(parsing: .unconditional, help: "OpenBLAS threads.") var threads: Int = 2

    /// The algorithm names accepted: the server's and the kohya module's (`lora` is LoCon,
    /// `norm` the norm adapter).
    static let algorithmNames = ["lora", "locon", "loha", "lokr", "ia3", "dylora", "norm"]

    /// The algorithm `name` selects (case-insensitive), or nil.
    static func algorithm(named name: String) -> Algorithm? {
        switch name.lowercased() {
        case "lora": .locon
        case "norm", "norms": .norms
        case let other: Algorithm(rawValue: other)
        }
    }

    func validate() throws {
        guard Self.algorithm(named: algo) != nil else {
            throw ValidationError("unknown algorithm '\(algo)'; choose one of \(Self.algorithmNames.joined(separator: ", "))")
        }
        guard steps > 0 else { throw ValidationError("--steps must be positive, got \(steps)") }
        guard learningRate > 0, learningRate.isFinite else {
            throw ValidationError("--learning-rate must be a positive number, got \(learningRate)")
        }
        guard threads > 0 else { throw ValidationError("--threads must be at least 1, got \(threads)") }
    }

    /// The toy model's norm layers, which only the norm algorithm adapts (as LyCORIS's
    /// `train_norm` does): a LayerNorm and a GroupNorm, without bias.
    static let normLayers: [(name: String, spec: LayerSpec)] = [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1",
         .norm(Normalization(kind: .layer(normalizedShape: [64]), hasBias: false))),
        ("lora_unet_down_blocks_0_resnets_0_norm1", .norm(Normalization(kind: .group(groups: 4, channels: 16), hasBias: false))),
    ]

    /// The input of one step: 16 rows of a linear layer or LayerNorm, a (2, C, 8, 8) batch
    /// for a convolution or GroupNorm.
    static func inputShape(_ spec: LayerSpec) -> [Int] {
        switch spec {
        case .linear: [16, spec.inputChannels]
        case let .norm(normalization):
            if case let .layer(normalizedShape) = normalization.kind { [16] + normalizedShape } else { [2, spec.inputChannels, 8, 8] }
        case .convolution: [2, spec.inputChannels, 8, 8]
        }
    }

    /// The toy model: kohya-named layers with SD-like roles at small sizes.
    static let layers: [(name: String, spec: LayerSpec)] = [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", .linear(inFeatures: 64, outFeatures: 64)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", .linear(inFeatures: 64, outFeatures: 64)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", .linear(inFeatures: 256, outFeatures: 64)),
        ("lora_unet_down_blocks_0_resnets_0_conv1", .convolution(ConvGeometry(inChannels: 16, outChannels: 16, kernelSize: [3, 3], padding: [1, 1]))),
    ]

    func run() throws {
        let algorithm = Self.algorithm(named: algo)!  // validate() checked it
        let layers = algorithm == .norms ? Self.normLayers : Self.layers
        BLASThreads.set(threads)
        var random = RandomSource(seed: seed)
        var options = AdapterOptions(rank: 8, alpha: 4)
        options.blockSize = 2
        var network = Network()
        var teachers: [String: Tensor] = [:]
        for (name, spec) in layers {
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
        print("training \(algorithm.rawValue) on \(layers.count) layers (\(network.parameterCount) parameters), \(steps) steps")
        let start = Date()
        var losses: [Float] = []
        for step in 1...steps {
            optimizer.beginStep()
            var loss: Float = 0
            for var module in network.modules {
                let spec = module.layer
                let inputShape = Self.inputShape(spec)
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
            losses.append(loss / Float(layers.count))
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
