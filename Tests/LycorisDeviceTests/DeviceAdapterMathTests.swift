import LycorisAlgorithms
import LycorisCore
import LycorisCUDA
@testable import LycorisDevice
import Testing

/// The device backend's weight path on the emulated device (lycoris_kernels.cu compiled as C,
/// column-major cblas_sgemm) against the host engine: every case of ``DeviceSelfCheck``, the
/// same comparison `lycoris-server --device-check cuda:0` runs on a GPU.
@Suite struct DeviceAdapterMathTests {
    @Test(arguments: DeviceSelfCheck.cases)
    func theEmulatedDeviceComputesWhatTheHostEngineDoes(check: DeviceSelfCheck.Case) throws {
        let device = EmulatedDevice()
        let comparisons = try DeviceSelfCheck.run(check, on: device)
        #expect(comparisons.count >= 2)
        for comparison in comparisons {
            // Only a norm layer without a bias has an all-zero result (∂b_norm, as on the host).
            let zeroByDesign = comparison.what == "∂b_norm" && check.name.hasSuffix("without bias")
            #expect(comparison.scale > 0 || zeroByDesign, "\(comparison.what): the host's result is all zeros")
            #expect(comparison.error <= DeviceSelfCheck.tolerance, "\(comparison.what): relative error \(comparison.error)")
        }
        #expect(device.liveAllocations.isEmpty, "the check or the workspace leaked device memory")
    }

    /// The comparison is not vacuous: a device run with another multiplier than the host's fails it.
    @Test func aWrongMultiplierIsCaught() throws {
        let device = EmulatedDevice()
        let layer = LayerSpec.linear(inFeatures: 6, outFeatures: 5)
        var random = RandomSource(seed: 1)
        var algorithm = try Algorithm.locon.makeAdapter(layer: layer, options: AdapterOptions(rank: 2, alpha: 1), random: &random)
        algorithm.parameters["lora_up.weight"] = .normal([5, 2], std: 1, using: &random)
        let module = AdapterModule(name: "m", algorithm: algorithm, options: AdapterOptions(rank: 2, alpha: 1))
        let memory = DeviceSelfCheck.Uploads(device)
        defer { memory.freeAll() }
        let output = try memory.unwritten(layer.weightShape)
        try DeviceAdapterMath(runtime: device).deltaWeight(of: module, parameters: try memory.upload(algorithm.parameters),
                                                           multiplier: 0.5, baseWeight: nil, into: output)
        let host = try algorithm.deltaWeight(DeltaContext()) * 0.7
        let device05 = try memory.download(output)
        #expect(relative(device05, host) > 0.2)
        #expect(relative(device05, host * (0.5 / 0.7)) <= 1e-5)
    }

    private func relative(_ a: Tensor, _ b: Tensor) -> Float {
        zip(a.scalars, b.scalars).map { abs($0 - $1) }.max()! / b.maxAbs
    }
}
