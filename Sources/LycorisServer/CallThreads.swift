import LycorisAlgorithms
import LycorisCore

/// The threads a `forward` or `backward` call computes on (OpenBLAS's, which the engine's
/// `ParallelRanges` passes follow). A call with little adapter math runs on one thread: the
/// client (torch) computes right before and after each call, and torch's OpenMP workers
/// busy-wait for milliseconds after each of its ops, holding the other cores — a second
/// server thread waits for one (OpenBLAS's caller in a `sched_yield` loop,
/// `concurrentPerform`'s blocked) and costs more than it saves. Measured with torch on 2
/// threads (bench/README section 6, "Transfer-bound rows"): the two server calls of LoRA on
/// a 3×3 conv 1280 @8×8 took 3.1 ms (fastest of 20 steps) on one thread against 5.0 on two,
/// LoKr there 5.2 against 14.5; the server's CPU per step halved and its context switches
/// went from ~100 to 3.
enum CallThreads {
    /// Multiply-adds below which a call runs on one thread: about 3 ms of GEMM on one core
    /// here, the time torch's workers keep spinning after an op.
    static let oneThreadBelow = 1 << 28

    /// `body` on one thread when `multiplyAdds` is below ``oneThreadBelow``, else on the
    /// server's threads (``BLASThreads/current``), which are set back afterwards.
    static func run<T>(multiplyAdds: Int, _ body: () throws -> T) rethrows -> T {
        let threads = BLASThreads.current
        guard threads > 1, multiplyAdds < oneThreadBelow else { return try body() }
        BLASThreads.set(1)
        defer { BLASThreads.set(threads) }
        return try body()
    }

    /// Multiply-adds of one forward pass of `module` on an input of `shape`: per output
    /// position the factor path's (``AdapterAlgorithm/bypassCost``) or op(x, ΔW)'s (|W|);
    /// an elementwise call's element count — unless it carries the layer's input
    /// (`layerInputShape`: DoRA's output_with_input side), whose factor chain over that input
    /// is the call's work. A backward costs about twice as much.
    static func forwardMultiplyAdds(_ module: AdapterModule, inputShape shape: [Int], elementwise: Bool,
                                    layerInputShape: [Int]? = nil) -> Int {
        if let layerInputShape { return forwardMultiplyAdds(module, inputShape: layerInputShape, elementwise: false) }
        if elementwise { return shape.product }
        let layer = module.layer
        let positions = layer.outputShape(forInput: shape).product / Swift.max(layer.outFeatures, 1)
        let perPosition = module.hasCheaperFactorPath ? (module.algorithm.bypassCost ?? 0) : layer.weightShape.product
        return positions * perPosition
    }
}
