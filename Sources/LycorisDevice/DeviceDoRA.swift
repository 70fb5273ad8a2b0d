import LycorisAlgorithms
import LycorisCore

/// DoRA's weight decomposition on a device, around a LoCon, LoHa or LoKr weight path — the
/// host's ``DoRA`` in device memory (groups g: W0's rows, or its input channels; the axis of
/// `dora_scale`):
///
///     V = W0 + mask ⊙ ΔW                         (ΔW the base algorithm's, multiplier 1)
///     n_g = ‖V_g‖,  c_g = m·(mag_g/(n_g + ε) − 1) + 1      (ε = Float.ulpOfOne)
///     m·ΔW = V ⊙ c − W0
///     ∂mag_g = m·s_g/(n_g + ε),  s_g = Σ_{e∈g} ∂W'_e·V_e
///     ∂V = ∂W' ⊙ c − V ⊙ m·mag_g·s_g/((n_g + ε)²·n_g);  the base's ∂ΔW = mask ⊙ ∂V
///
/// The group sums are ``DeviceAlgebra/channelDot(into:_:_:scale:stride:channels:)`` (double
/// accumulation, rounded to float); the scalars of each group are one kernel
/// (`lycoris_dora_scales`, in double). The host sums and keeps the norms in double, so the two
/// differ by float rounding only (the self-check's cases `… +dora …`: within 3e-7 on the
/// emulated device). NOT YET RUN ON A GPU.
extension DeviceAdapterMath {
    /// V = W0 + mask ⊙ ΔW and Σ V ⊙ V per group.
    func doraWeight(_ algebra: DeviceAlgebra, _ base: FactoredWeight, _ p: Factors<DeviceTensor>, _ axis: ChannelAxis,
                    baseWeight: DeviceTensor, rowMask: DeviceTensor?) throws -> (v: DeviceTensor, squares: DeviceTensor) {
        let delta = base.deltaWeight(algebra, p, multiplier: 1)
        try algebra.check()
        let v = algebra.adding(try masked(algebra, delta, rowMask), baseWeight)
        try algebra.check()
        return (v, try doraSums(algebra, v, v, axis))
    }

    /// Σ a ⊙ b per group (channels,).
    func doraSums(_ algebra: DeviceAlgebra, _ a: DeviceTensor, _ b: DeviceTensor, _ axis: ChannelAxis) throws -> DeviceTensor {
        let out = DeviceTensor(address: try workspace.buffer(axis.channels), shape: [axis.channels])
        try algebra.channelDot(into: out, a, b, scale: 1, stride: axis.stride, channels: axis.channels)
        return out
    }

    /// c, ∂mag and the norm's coefficient per group from the sums (`dots` = `squares` in the forward).
    func doraScales(_ axis: ChannelAxis, squares: DeviceTensor, dots: DeviceTensor, magnitude: DeviceTensor,
                    multiplier m: Float) throws -> (factor: DeviceTensor, gradMagnitude: DeviceTensor, normCoefficient: DeviceTensor) {
        let groups = axis.channels
        let (factor, gradMagnitude, normCoefficient) = (try workspace.buffer(groups), try workspace.buffer(groups),
                                                        try workspace.buffer(groups))
        try runtime.launch(.doraScales(factor: factor, gradMagnitude: gradMagnitude, normCoefficient: normCoefficient,
                                       squares: squares.address, dots: dots.address, magnitude: magnitude.address, m: m,
                                       eps: Double(Float.ulpOfOne), groups: groups))
        return (DeviceTensor(address: factor, shape: [groups]), DeviceTensor(address: gradMagnitude, shape: [groups]),
                DeviceTensor(address: normCoefficient, shape: [groups]))
    }
}

extension DeviceAlgebra {
    /// x scaled per DoRA group (or IA3 channel) along `axis`.
    func scalingChannels(_ value: DeviceTensor, by factors: DeviceTensor, _ axis: DeviceAdapterMath.ChannelAxis) -> DeviceTensor {
        scalingChannels(value, by: factors, stride: axis.stride, channels: axis.channels)
    }
}
