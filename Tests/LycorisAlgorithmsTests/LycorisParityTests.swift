import LycorisAlgorithms
import LycorisCore
import LycorisTestSupport
import Testing

/// Every algorithm and option against LyCORIS 4.1.3 (fixtures computed in float64):
/// parameter shapes, ΔW (and norm's Δb), the adapted layer's output, ∂x, every ∂parameter,
/// saved tensors. The norm cases LyCORIS cannot run (a multi-axis normalized_shape, a
/// LayerNorm without bias) hold its formula's values, computed by torch (fixture metadata
/// `lycoris`).
@Suite("Parity with LyCORIS 4.1.3")
struct LycorisParityTests {
    @Test("fixtures exist for every computed algorithm")
    func fixtureCoverage() throws {
        let algorithms = Set(try ModuleFixture.allNames.map { try ModuleFixture($0).algorithm })
        #expect(algorithms == Set(Algorithm.allCases))
    }

    @Test("ΔW, output and gradients", arguments: ModuleFixture.allNames)
    func forwardAndBackward(_ name: String) throws {
        let fixture = try ModuleFixture(name)
        let module = try fixture.makeModule()
        let tape = fixture.tape(for: module)
        if fixture.options.bypassMode == true { #expect(tape.bypass == fixture.bypass) }
        let x = try fixture.tensor("input")
        let gradOutput = try fixture.tensor("grad_output")

        expectClose(try module.effectiveDeltaWeight(tape), try fixture.tensor("expected.delta_weight"), "\(name) ΔW")
        let deltaBias = try module.effectiveDeltaBias(tape)
        #expect((deltaBias != nil) == fixture.file.contains("expected.delta_bias"), "\(name): Δb exactly where LyCORIS applies one")
        if let deltaBias { expectClose(deltaBias, try fixture.tensor("expected.delta_bias"), "\(name) Δb") }
        expectClose(try module.forward(x, tape: tape), try fixture.tensor("expected.output"), "\(name) output")
        let grads = try module.backward(x, gradOutput: gradOutput, tape: tape)
        expectClose(grads.input, try fixture.tensor("expected.grad_input"), "\(name) ∂x")
        #expect(Set(grads.parameters.names) == Set(fixture.parameterNames), "\(name): gradient set")
        for parameter in fixture.parameterNames {
            guard let grad = grads.parameters[parameter] else { continue }
            expectClose(grad, try fixture.tensor("expected.grad.\(parameter)"), "\(name) ∂\(parameter)")
        }
    }

    /// Every fixture through both evaluation orders: forced rebuild (op(x, W0 + m·ΔW)) and
    /// forced bypass (the factor paths, on convolutions too: stride, dilation, groups,
    /// Tucker). The bypass of IA3 scales the bias, and that of Diag-OFT/BOFT rotates it, so
    /// those cases are checked in the mode LyCORIS ran them in. DoRA has no bypass:
    /// forced bypass computes the same rebuilt weight.
    static var modeCases: [(String, Bool)] {
        ModuleFixture.allNames.flatMap { name in
            transformsBiasInBypass(name) ? [(name, name.contains("_bypass"))] : [(name, false), (name, true)]
        }
    }

    static func transformsBiasInBypass(_ name: String) -> Bool {
        ["ia3", "oft", "boft"].contains { name.hasPrefix($0 + "_") }
    }

    @Test("forced rebuild and forced bypass compute LyCORIS's function", arguments: modeCases)
    func forcedModes(_ name: String, _ bypass: Bool) throws {
        let fixture = try ModuleFixture(name)
        var module = try fixture.makeModule()
        module.options.bypassMode = bypass
        let tape = fixture.tape(for: module)
        #expect(tape.bypass == (bypass && !fixture.options.weightDecompose))
        let x = try fixture.tensor("input")
        let mode = bypass ? "bypass" : "rebuild"
        expectClose(try module.forward(x, tape: tape), try fixture.tensor("expected.output"), "\(name) \(mode) output")
        let grads = try module.backward(x, gradOutput: try fixture.tensor("grad_output"), tape: tape)
        expectClose(grads.input, try fixture.tensor("expected.grad_input"), "\(name) \(mode) ∂x")
        for parameter in fixture.parameterNames {
            let grad = try #require(grads.parameters[parameter], "\(name): no gradient for \(parameter)")
            expectClose(grad, try fixture.tensor("expected.grad.\(parameter)"), "\(name) \(mode) ∂\(parameter)")
        }
    }

    @Test("rebuild-mode ΔW (and Δb) backward equals the layer gradient", arguments: ModuleFixture.allNames)
    func deltaWeightBackward(_ name: String) throws {
        // A trainer applying W0 + ΔW (and b + Δb) itself sends ∂L/∂W' = op_W-gradient (and
        // ∂L/∂b') back; the parameter gradients must equal the in-layer ones.
        let fixture = try ModuleFixture(name)
        guard !fixture.bypass || !Self.transformsBiasInBypass(name) else { return }  // their bypass transforms the bias too
        let module = try fixture.makeModule()
        let tape = fixture.tape(for: module)
        let gradOutput = try fixture.tensor("grad_output")
        let gradWeight = module.layer.backwardWeight(try fixture.tensor("input"), gradOutput: gradOutput)
        let gradBias = module.algorithm.adaptsBias ? module.layer.biasGradient(gradOutput) : nil
        let grads = try module.effectiveDeltaWeightBackward(gradWeight, biasGradient: gradBias, tape)
        for parameter in fixture.parameterNames {
            let grad = try #require(grads[parameter], "\(name): no gradient for \(parameter)")
            expectClose(grad, try fixture.tensor("expected.grad.\(parameter)"), "\(name) ∂\(parameter) via ΔW")
        }
    }

    @Test("saved keys, shapes and values", arguments: ModuleFixture.allNames)
    func savedTensors(_ name: String) throws {
        let fixture = try ModuleFixture(name)
        let module = try fixture.makeModule()
        let saved = module.algorithm.savedTensors()
        let ours = Dictionary(uniqueKeysWithValues: saved.map { ($0.suffix, $0) })
        for (key, shape, dtype) in fixture.savedKeys {
            let entry = try #require(ours[key], "\(name): LyCORIS saves \(key), we do not")
            var expected = try fixture.tensor("expected.saved.\(key)")
            if fixture.algorithm == .dylora {
                // Deliberate difference (see DyLoRA): 4-D conv `lora_up`, alpha·block_size.
                if key == "lora_up.weight" && module.layer.isConvolution {
                    expected = expected.reshaped(expected.shape + module.layer.kernelSize.map { _ in 1 })
                }
                if key == "alpha" { expected = expected * Float(fixture.options.blockSize) }
            } else if fixture.algorithm == .glora && fixture.options.rsLoRA && key == "alpha" {
                // Deliberate difference (see GLoRA): alpha·r/√r, so that alpha/r reloads the scale.
                expected = expected * Float(fixture.options.rank).squareRoot()
            } else {
                #expect(entry.tensor.shape == shape, "\(name): \(key) shape")
            }
            if fixture.algorithm == .tlora && key == "alpha" {
                // Deliberate difference: LyCORIS saves T-LoRA's alpha = r (alpha 0) as I64.
                #expect(entry.storage == .float32, "\(name): alpha is saved F32")
            } else {
                #expect((entry.storage == .int64) == (dtype == "I64"), "\(name): \(key) dtype \(dtype)")
            }
            expectClose(entry.tensor, expected, "\(name) saved \(key)")
        }
        #expect(Set(ours.keys) == Set(fixture.savedKeys.map(\.key)), "\(name): saved key set")
    }

    @Test("scale", arguments: ModuleFixture.allNames)
    func scale(_ name: String) throws {
        let fixture = try ModuleFixture(name)
        let module = try fixture.makeModule()
        if let dylora = module.algorithm as? DyLoRA, let block = fixture.dyloraBlock {
            #expect(abs(dylora.scale(block: block) - fixture.scale) <= 1e-6 * fixture.scale)
        } else {
            #expect(abs(module.algorithm.scale - fixture.scale) <= 1e-6 * fixture.scale, "\(name): scale")
        }
    }
}
