import Foundation
import LycorisAlgorithms
import LycorisCheckpoints
import LycorisCore
import LycorisTestSupport
import LycorisFormats
import Testing

/// Networks saved here reload (here and, by key and shape, as LyCORIS writes them) and
/// compute the same adapted outputs; F16/BF16 saves round to nearest even.
@Suite("Save and reload")
struct RoundTripTests {
    static let linear = LayerSpec.linear(inFeatures: 24, outFeatures: 20)
    static let conv = LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], padding: [1, 1]))
    static let conv1d = LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3], stride: [2], padding: [1]))
    static let conv3d = LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3, 3], padding: [1, 1, 1]))

    /// An input for `layer`: linear (2, 3, in); conv (2, C, spatial…).
    static func inputShape(_ layer: LayerSpec) -> [Int] {
        guard layer.isConvolution else { return [2, 3, layer.inputChannels] }
        return [2, layer.inputChannels] + [[7], [5, 6], [3, 4, 5]][layer.kernelSize.count - 1]
    }

    struct Case: CustomTestStringConvertible, Sendable {
        let algorithm: Algorithm
        let layer: LayerSpec
        let options: AdapterOptions
        var testDescription: String { "\(algorithm.rawValue)\(options.weightDecompose ? " dora" : "") \(layer.kind)" }
    }

    static var cases: [Case] {
        var scalar = AdapterOptions(rank: 4, alpha: 2)
        scalar.useScalar = true
        var tucker = AdapterOptions(rank: 4, alpha: 3)
        tucker.useTucker = true
        var dylora = AdapterOptions(rank: 4, alpha: 3)
        dylora.blockSize = 2
        var input = AdapterOptions()
        input.trainOnInput = true
        var lokr = AdapterOptions(rank: 2, alpha: 1)
        lokr.decomposeBoth = true
        lokr.factor = 2
        var oft = AdapterOptions(rank: 4, alpha: 1)
        oft.rescaled = true
        oft.constraint = 0.05
        var boft = AdapterOptions(rank: 10, alpha: 1)
        boft.rescaled = true
        var boftConv = AdapterOptions(rank: 6, alpha: 1)
        boftConv.constraint = 0.05
        var dora = AdapterOptions(rank: 4, alpha: 2)
        dora.weightDecompose = true
        var doraInput = AdapterOptions(rank: 2, alpha: 3)
        doraInput.weightDecompose = true
        doraInput.wdOnOutput = false
        return [
            Case(algorithm: .locon, layer: linear, options: scalar), Case(algorithm: .locon, layer: conv, options: tucker),
            Case(algorithm: .loha, layer: linear, options: scalar), Case(algorithm: .loha, layer: conv, options: tucker),
            Case(algorithm: .lokr, layer: linear, options: lokr), Case(algorithm: .lokr, layer: conv, options: tucker),
            Case(algorithm: .ia3, layer: linear, options: input), Case(algorithm: .ia3, layer: conv, options: AdapterOptions()),
            Case(algorithm: .dylora, layer: linear, options: dylora), Case(algorithm: .dylora, layer: conv, options: dylora),
            Case(algorithm: .locon, layer: conv1d, options: tucker), Case(algorithm: .locon, layer: conv3d, options: scalar),
            Case(algorithm: .loha, layer: conv1d, options: scalar), Case(algorithm: .loha, layer: conv3d, options: tucker),
            Case(algorithm: .lokr, layer: conv1d, options: lokr), Case(algorithm: .lokr, layer: conv3d, options: tucker),
            Case(algorithm: .ia3, layer: conv1d, options: input), Case(algorithm: .ia3, layer: conv3d, options: AdapterOptions()),
            Case(algorithm: .dylora, layer: conv1d, options: dylora), Case(algorithm: .dylora, layer: conv3d, options: dylora),
            Case(algorithm: .diagOFT, layer: linear, options: oft), Case(algorithm: .diagOFT, layer: conv, options: oft),
            Case(algorithm: .diagOFT, layer: conv3d, options: oft),
            Case(algorithm: .boft, layer: linear, options: boft), Case(algorithm: .boft, layer: conv, options: boftConv),
            Case(algorithm: .boft, layer: conv1d, options: boftConv),
            Case(algorithm: .locon, layer: linear, options: dora), Case(algorithm: .loha, layer: conv, options: doraInput),
            Case(algorithm: .lokr, layer: conv1d, options: doraInput), Case(algorithm: .locon, layer: conv3d, options: dora),
            Case(algorithm: .glora, layer: linear, options: scalar), Case(algorithm: .glora, layer: conv, options: tucker),
            Case(algorithm: .glora, layer: conv3d, options: dylora),
            Case(algorithm: .full, layer: linear, options: AdapterOptions()), Case(algorithm: .full, layer: conv1d, options: AdapterOptions()),
        ]
    }

    func temporaryPath(_ label: String) -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("\(label)-\(UUID()).safetensors").path
    }

    /// A module with every parameter random (σ too), on a random base layer.
    func randomModule(_ testCase: Case, seed: UInt64) throws -> AdapterModule {
        var random = RandomSource(seed: seed)
        var other = RandomSource(seed: seed + 100)
        var adapter = try testCase.algorithm.makeAdapter(layer: testCase.layer, options: testCase.options, random: &random,
                                                         baseWeight: .normal(testCase.layer.weightShape, std: 0.5, using: &other), hasBias: true)
        for (name, tensor) in adapter.parameters.entries { adapter.parameters[name] = .normal(tensor.shape, std: 0.5, using: &random) }
        return AdapterModule(name: "lora_unet_block_\(testCase.algorithm.rawValue)", algorithm: adapter, options: testCase.options,
                             baseWeight: .normal(testCase.layer.weightShape, std: 0.5, using: &random),
                             baseBias: .normal([testCase.layer.outFeatures], std: 0.5, using: &random))
    }

    @Test("F32 save → load gives the same eval-mode output", arguments: cases)
    func roundTrip(_ testCase: Case) throws {
        let module = try randomModule(testCase, seed: 11)
        var network = Network()
        try network.add(module)
        let path = temporaryPath("roundtrip")
        defer { try? FileManager.default.removeItem(atPath: path) }
        try network.save(toPath: path, metadata: ["ss_network_module": "swift_lycoris"])

        let file = try AdapterFile(path: path)
        #expect(file.metadata["ss_network_module"] == "swift_lycoris")
        let header = Array(FileManager.default.contents(atPath: path)!.prefix(10))
        #expect(Array(header[8..<10]) == Array("{\"".utf8))
        if let alpha = file.modules.first?.tensors["alpha"] { #expect(alpha.dtype == .f32 && alpha.shape == []) }
        let (loaded, unmatched) = try Network.load(file, layers: [module.name: (module.layer, module.baseWeight, module.baseBias)])
        #expect(unmatched.isEmpty)
        let reloaded = try #require(loaded[module.name])
        for saved in module.algorithm.savedTensors() where saved.suffix != "alpha" && saved.suffix != "on_input" {
            #expect(file.modules[0].tensors[saved.suffix]?.shape == saved.tensor.shape, "\(saved.suffix) shape in the file")
        }

        var random = RandomSource(seed: 5)
        let inputShape = Self.inputShape(testCase.layer)
        let x = Tensor.normal(inputShape, std: 1, using: &random)
        let expected = try module.forward(x, tape: module.makeTape(inputShape: inputShape, random: &random))
        let actual = try reloaded.forward(x, tape: reloaded.makeTape(inputShape: inputShape, random: &random))
        expectClose(actual, expected, "\(testCase.testDescription) reloaded output")
    }

    @Test("F16 and BF16 saves store every tensor rounded to nearest even", arguments: [DType.f16, .bf16])
    func halfPrecision(_ dtype: DType) throws {
        let module = try randomModule(Self.cases[3], seed: 12)
        var network = Network()
        try network.add(module)
        let path = temporaryPath("half")
        defer { try? FileManager.default.removeItem(atPath: path) }
        try network.save(toPath: path, dtype: dtype)
        let file = try SafetensorsFile(path: path)
        for saved in module.algorithm.savedTensors() {
            let info = try #require(file.info("\(module.name).\(saved.suffix)"))
            #expect(info.dtype == (saved.suffix == "alpha" ? .f32 : dtype))
            let rounded = try encodeFloats(saved.tensor.scalars, as: info.dtype).withUnsafeBytes { decodeFloats($0, as: info.dtype) }
            #expect(try file.tensor(info.name).scalars == rounded, "\(info.name)")
        }
    }

    @Test("saving as a non-float dtype is refused")
    func refusesIntegerDtype() throws {
        var network = Network()
        try network.add(randomModule(Self.cases[0], seed: 1))
        #expect(throws: AdapterError.self) { try network.save(toPath: temporaryPath("int"), dtype: .i32) }
    }

    @Test("IA3 files reload (LyCORIS 4.1.3 cannot reload its own)")
    func ia3FromLyCORIS() throws {
        let file = try AdapterFile(path: NetworkFixture.path("ia3"))
        for module in file.modules {
            let info = try #require(module.tensors["weight"])
            let layer: LayerSpec = info.shape.count == 1 ? .linear(inFeatures: 99, outFeatures: info.shape[0])
                : .convolution(ConvGeometry(inChannels: 99, outChannels: info.shape[1], kernelSize: [1, 1]))
            let adapter = try file.adapter(for: module, layer: layer)
            #expect(adapter is IA3)
        }
    }

    @Test("DyLoRA conv files reload, and reproduce the full-rank forward", arguments: [9, 18, 19])
    func dyloraConvReload(_ caseIndex: Int) throws {
        let module = try randomModule(Self.cases[caseIndex], seed: 13)
        var network = Network()
        try network.add(module)
        let path = temporaryPath("dylora")
        defer { try? FileManager.default.removeItem(atPath: path) }
        try network.save(toPath: path)
        let file = try AdapterFile(path: path)
        #expect(file.modules[0].tensors["lora_up.weight"]?.shape == [12, 4] + module.layer.kernelSize.map { _ in 1 })
        let reloaded = try file.adapter(for: file.modules[0], layer: module.layer)
        #expect(reloaded is LoCon)
        var random = RandomSource(seed: 0)
        let eval = module.makeTape(inputShape: [], random: &random)
        expectClose(try reloaded.deltaWeight(DeltaContext()), try module.effectiveDeltaWeight(eval), "DyLoRA ΔW after reload")
    }

    @Test("LyCORIS's 2-D conv lora_up (DyLoRA files) is accepted as (out, r, 1, 1)")
    func dyloraLyCORISConv() throws {
        let file = try AdapterFile(path: NetworkFixture.path("dylora"))
        let conv = try #require(file.modules.first { $0.name == "lycoris_down_blocks_0_resnets_0_conv1" })
        let adapter = try file.adapter(for: conv, layer: .convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3])))
        #expect(adapter.parameters["lora_up.weight"]?.shape == [12, 4, 1, 1])
    }

    /// A model with a conv1d and a conv3d weight (and biases), an adapter file on both: the
    /// merged weights give the adapted layers' outputs.
    @Test("merge into conv1d (3-D) and conv3d (5-D) base weights", arguments: [Algorithm.locon, .loha, .lokr, .ia3, .glora, .full])
    func mergeConv1dConv3d(_ algorithm: Algorithm) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("merge-convnd-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        var base = SafetensorsWriter()
        var network = Network()
        var modules: [(path: String, module: AdapterModule)] = []
        var options = AdapterOptions(rank: 2, alpha: 3)
        options.useTucker = true
        for (index, (path, layer)) in [("seq.conv", Self.conv1d), ("volume.conv", Self.conv3d)].enumerated() {
            var module = try randomModule(Case(algorithm: algorithm, layer: layer, options: options), seed: 30 + UInt64(index))
            module.name = KeySchema.moduleName(prefix: KeySchema.unetPrefix, path: path)
            try base.add("\(path).weight", module.baseWeight!, as: .f32)
            try base.add("\(path).bias", module.baseBias!, as: .f32)
            try network.add(module)
            modules.append((path, module))
        }
        let basePath = directory.appendingPathComponent("base.safetensors").path
        let adapterPath = directory.appendingPathComponent("adapter.safetensors").path
        let outputPath = directory.appendingPathComponent("merged.safetensors").path
        try base.write(toPath: basePath)
        try network.save(toPath: adapterPath)
        let report = try CheckpointMerge.merge(checkpoint: basePath, adapters: [.init(path: adapterPath, multiplier: 1)], output: outputPath)
        #expect(report.failed.isEmpty, "\(report.failed)")
        #expect(Set(report.merged.map(\.key)) == ["seq.conv.weight", "volume.conv.weight"])
        let merged = try SafetensorsFile(path: outputPath)
        var random = RandomSource(seed: 4)
        for (path, module) in modules {
            let x = Tensor.normal(Self.inputShape(module.layer), std: 1, using: &random)
            var y = module.layer.apply(x, weight: try merged.tensor("\(path).weight"))
            module.layer.addBias(&y, bias: try merged.tensor("\(path).bias"))
            let expected = try module.forward(x, tape: module.makeTape(inputShape: x.shape, random: &random))
            expectClose(y, expected, "\(algorithm.rawValue) merged \(module.layer.kind)")
        }
    }

    @Test("a file module whose shapes do not fit the layer is refused, naming the tensor")
    func shapeMismatch() throws {
        let file = try AdapterFile(path: NetworkFixture.path("lora"))
        let module = file.modules[0]
        #expect {
            _ = try file.adapter(for: module, layer: .linear(inFeatures: 7, outFeatures: 24))
        } throws: { error in
            "\(error)".contains("lora_down.weight") && "\(error)".contains("[4, 16]")
        }
    }

    @Test("GLoRA refuses a Tucker core (bm.weight) and grouped convolutions, naming them")
    func gloraRefusals() throws {
        var random = RandomSource(seed: 1)
        let fresh = try Algorithm.glora.makeAdapter(layer: Self.linear, options: AdapterOptions(rank: 2, alpha: 1), random: &random)
        var tensors = Dictionary(uniqueKeysWithValues: fresh.parameters.entries.map { ($0.name, $0.tensor) })
        #expect(try Algorithm.glora.loadAdapter(layer: Self.linear, tensors: tensors, alpha: 1).rank == 2)
        tensors["bm.weight"] = .zeros([2, 2, 3, 3])
        #expect { _ = try Algorithm.glora.loadAdapter(layer: Self.linear, tensors: tensors, alpha: 1) } throws: { "\($0)".contains("bm.weight") }
        let grouped = LayerSpec.convolution(ConvGeometry(inChannels: 8, outChannels: 12, kernelSize: [3, 3], groups: 2))
        #expect { _ = try Algorithm.glora.makeAdapter(layer: grouped, options: AdapterOptions(), random: &random) } throws: {
            "\($0)".contains("glora does not adapt grouped convolutions (groups 2)")
        }
    }

    @Test("DoRA files saved on input columns reload (LyCORIS 4.1.3 cannot: it reads dora_scale as (out, 1))")
    func doraInputAxisReload() throws {
        let file = try AdapterFile(path: NetworkFixture.path("dora_loha_input"))
        let module = try #require(file.modules.first { $0.name == "lycoris_down_blocks_0_attentions_0_proj_in" })
        #expect(module.tensors["dora_scale"]?.shape == [1, 16])
        let adapter = try file.adapter(for: module, layer: .linear(inFeatures: 16, outFeatures: 24))
        let dora = try #require(adapter as? DoRA<LoHa>)
        #expect(!dora.onOutput)
        var tensors = try file.tensors(of: module)
        tensors["dora_scale"] = .zeros([16, 1])
        #expect {
            _ = try Algorithm.loha.loadAdapter(layer: .linear(inFeatures: 16, outFeatures: 24), tensors: tensors, alpha: module.alpha)
        } throws: { error in "\(error)".contains("dora_scale has shape [16, 1], expected [24, 1] (output axis) or [1, 16] (input axis)") }
    }
}
