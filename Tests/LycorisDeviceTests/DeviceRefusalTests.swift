import LycorisAlgorithms
import LycorisCore
import LycorisCUDA
@testable import LycorisDevice
import Testing

/// What the device backend refuses, each with an error naming the problem: algorithms it does
/// not compute (never a silent wrong path), parameters and buffers that do not fit the module.
@Suite struct DeviceRefusalTests {
    /// The algorithms ``DeviceAdapterMath`` computes; every other one must be refused.
    static let ported: Set<Algorithm> = [.locon, .loha, .lokr, .dylora, .glora, .ia3, .full, .norms]

    static func module(_ algorithm: Algorithm, _ configure: (inout AdapterOptions) -> Void = { _ in }) throws -> AdapterModule {
        let layer = algorithm == .norms ? LayerSpec.norm(Normalization(kind: .layer(normalizedShape: [8])))
            : .linear(inFeatures: 8, outFeatures: 8)
        var options = AdapterOptions(rank: 2, alpha: 1)
        options.blockSize = 2
        configure(&options)
        var random = RandomSource(seed: 3)
        let base = Tensor.normal(layer.weightShape, std: 1, using: &random)
        let adapter = try algorithm.makeAdapter(layer: layer, options: options, random: &random, baseWeight: base)
        return AdapterModule(name: "layer", algorithm: adapter, options: options, baseWeight: base)
    }

    @Test(arguments: Algorithm.allCases)
    func anAlgorithmIsComputedOrRefusedByName(algorithm: Algorithm) throws {
        let module = try Self.module(algorithm)
        let device = EmulatedDevice()
        let memory = DeviceSelfCheck.Uploads(device)
        defer { memory.freeAll() }
        let parameters = try memory.upload(module.algorithm.parameters)
        let output = try memory.unwritten(module.layer.weightShape)
        let base = try memory.upload(module.baseWeight!)
        if Self.ported.contains(algorithm) {
            try DeviceAdapterMath.checkComputes(module)
            let bias = module.algorithm.adaptsBias ? try memory.unwritten(module.layer.biasShape) : nil
            try DeviceAdapterMath(runtime: device).deltaWeight(of: module, parameters: parameters, multiplier: 1,
                                                               baseWeight: base, into: output, bias: bias)
            #expect(try memory.download(output).scalars.allSatisfy(\.isFinite))
        } else {
            let expected = DeviceError("`\(algorithm.rawValue)` does not compute on CUDA yet; use device \"cpu\"")
            #expect(throws: expected) { try DeviceAdapterMath.checkComputes(module) }
            #expect(throws: expected) {
                try DeviceAdapterMath(runtime: device).deltaWeight(of: module, parameters: parameters, multiplier: 1,
                                                                   baseWeight: base, into: output)
            }
            #expect(try memory.download(output).scalars.allSatisfy(\.isNaN), "a refused module wrote its output")
        }
    }

    /// DoRA around a ported algorithm is not that algorithm: refused as `<base>+dora`.
    @Test(arguments: [Algorithm.locon, .loha, .lokr])
    func doraAroundAPortedAlgorithmIsRefused(algorithm: Algorithm) throws {
        let module = try Self.module(algorithm) { $0.weightDecompose = true }
        #expect(throws: DeviceError("`\(algorithm.rawValue)+dora` does not compute on CUDA yet; use device \"cpu\"")) {
            try DeviceAdapterMath.checkComputes(module)
        }
    }

    @Test func parametersThatDoNotFitTheModuleAreRefusedByName() throws {
        let module = try Self.module(.locon)
        let device = EmulatedDevice()
        let memory = DeviceSelfCheck.Uploads(device)
        defer { memory.freeAll() }
        let math = DeviceAdapterMath(runtime: device)
        var parameters = try memory.upload(module.algorithm.parameters)
        let output = try memory.unwritten(module.layer.weightShape)
        func message(_ body: () throws -> Void) -> String {
            do { try body(); return "no error" } catch { return "\(error)" }
        }
        let missing = parameters.removeValue(forKey: "lora_down.weight")!
        #expect(message { try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, into: output) }
            == "layer: parameters lack lora_down.weight (expected lora_down.weight, lora_up.weight)")
        parameters["lora_down.weight"] = DeviceTensor(address: missing.address, shape: [8, 2])
        #expect(message { try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, into: output) }
            == "layer: parameters lora_down.weight has shape [8, 2], expected [2, 8]")
        parameters["lora_down.weight"] = missing
        parameters["hada_w1_a"] = missing
        #expect(message { try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, into: output) }
            == "layer: parameters name hada_w1_a, which is not a parameter of this locon module")
        parameters["hada_w1_a"] = nil
        #expect(message {
            try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil,
                                 into: DeviceTensor(address: output.address, shape: [8, 8, 1]))
        } == "layer: the ΔW output has shape [8, 8, 1], expected [8, 8]")
        #expect(message {
            try math.deltaWeight(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, into: output, bias: output)
        } == "layer: the Δb output given, but this module does not adapt the bias")
        #expect(message {
            try math.deltaWeightBackward(of: module, parameters: parameters, multiplier: 1, baseWeight: nil, gradient: output,
                                         into: ["lora_up.weight": parameters["lora_up.weight"]!])
        } == "layer: gradients lack lora_down.weight (expected lora_down.weight, lora_up.weight)")
        #expect(try memory.download(output).scalars.allSatisfy(\.isNaN), "a refused call wrote its output")
    }

    @Test func ia3WithoutTheBaseWeightAndDyLoRAOutsideItsBlocksAreRefused() throws {
        let device = EmulatedDevice()
        let memory = DeviceSelfCheck.Uploads(device)
        defer { memory.freeAll() }
        let math = DeviceAdapterMath(runtime: device)
        let ia3 = try Self.module(.ia3)
        let output = try memory.unwritten(ia3.layer.weightShape)
        #expect(throws: AdapterError("layer: ia3 needs the base layer's weight")) {
            try math.deltaWeight(of: ia3, parameters: try memory.upload(ia3.algorithm.parameters), multiplier: 1,
                                 baseWeight: nil, into: output)
        }
        let dylora = try Self.module(.dylora) { $0.rank = 4 }
        #expect(throws: AdapterError("dylora: block 2 is outside 0..<2")) {
            try math.deltaWeight(of: dylora, parameters: try memory.upload(dylora.algorithm.parameters), multiplier: 1,
                                 baseWeight: nil, block: 2, into: output)
        }
    }
}
