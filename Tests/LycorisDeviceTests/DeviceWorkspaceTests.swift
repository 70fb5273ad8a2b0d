import LycorisAlgorithms
import LycorisCore
@testable import LycorisDevice
import Testing

/// The workspace holds one call's working set: the first call of a size allocates, a repeat
/// allocates nothing, a smaller call reuses it, and it is all given back with the math object.
@Suite struct DeviceWorkspaceTests {
    static func module(_ layer: LayerSpec) throws -> AdapterModule {
        var random = RandomSource(seed: 9)
        var options = AdapterOptions(rank: 4, alpha: 1)
        options.useTucker = true
        let adapter = try Algorithm.loha.makeAdapter(layer: layer, options: options, random: &random)
        return AdapterModule(name: "loha", algorithm: adapter, options: options)
    }

    @Test func aRepeatedCallAllocatesNothingAndTheWorkspaceIsGivenBack() throws {
        let device = EmulatedDevice()
        let memory = DeviceSelfCheck.Uploads(device)
        defer { memory.freeAll() }
        let big = try Self.module(.convolution(ConvGeometry(inChannels: 16, outChannels: 24, kernelSize: [3, 3])))
        let small = try Self.module(.convolution(ConvGeometry(inChannels: 4, outChannels: 6, kernelSize: [3, 3])))
        let bigParameters = try memory.upload(big.algorithm.parameters), smallParameters = try memory.upload(small.algorithm.parameters)
        let bigOutput = try memory.unwritten(big.layer.weightShape), smallOutput = try memory.unwritten(small.layer.weightShape)
        let inputs = device.liveAllocations.count
        var math: DeviceAdapterMath? = DeviceAdapterMath(runtime: device)
        try math!.deltaWeight(of: big, parameters: bigParameters, multiplier: 1, baseWeight: nil, into: bigOutput)
        let held = math!.workspaceBytes
        // Two halves (out, in, 3, 3) plus the Tucker intermediates: at least the two halves, and
        // no more than a handful of weight-sized buffers.
        let weightBytes = big.layer.weightShape.reduce(1, *) * 4
        #expect(held >= 2 * weightBytes && held <= 8 * weightBytes, "workspace \(held) bytes for ΔW of \(weightBytes)")
        #expect(device.liveAllocations.count == inputs + 1, "one chunk between calls")
        let chunk = Set(device.liveAllocations.keys)
        try math!.deltaWeight(of: big, parameters: bigParameters, multiplier: 1, baseWeight: nil, into: bigOutput)
        try math!.deltaWeight(of: small, parameters: smallParameters, multiplier: 1, baseWeight: nil, into: smallOutput)
        #expect(Set(device.liveAllocations.keys) == chunk, "a repeat or smaller call allocated")
        #expect(math!.workspaceBytes == held)
        math = nil
        #expect(device.liveAllocations.count == inputs, "the workspace was not given back")
    }
}

/// The timing report's code path on the emulated device, with one small layer (its figures
/// mean nothing here; the GPU run prints SD 1.5's rows).
@Suite struct DeviceTimingTests {
    @Test func aRowIsTimedAndReported() throws {
        let device = EmulatedDevice()
        let row = DeviceTiming.Row("lokr linear 24x20", .lokr, .linear(inFeatures: 24, outFeatures: 20)) { $0.factor = 4 }
        var lines: [String] = []
        #expect(DeviceTiming.report([row], on: device, repeats: 2) { lines.append($0) })
        #expect(lines.count == 2 && lines[1].hasPrefix("lokr linear 24x20") && lines[1].contains(" ms   workspace "), "\(lines)")
        #expect(device.liveAllocations.isEmpty)
        #expect(DeviceTiming.sd15.count == 15)
    }
}
