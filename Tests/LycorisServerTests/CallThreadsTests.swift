import LycorisAlgorithms
import LycorisCore
@testable import LycorisServer
import Testing

@Suite("CallThreads: small calls on one thread", .serialized)
struct CallThreadsTests {
    @Test("a call below the threshold runs on one thread, a larger one on the server's; the count is set back")
    func threadsFollowTheWork() throws {
        let before = BLASThreads.current
        BLASThreads.set(2)
        defer { BLASThreads.set(before) }
        #expect(CallThreads.run(multiplyAdds: CallThreads.oneThreadBelow - 1) { BLASThreads.current } == 1)
        #expect(BLASThreads.current == 2)
        #expect(CallThreads.run(multiplyAdds: CallThreads.oneThreadBelow) { BLASThreads.current } == 2)
        struct Failure: Error {}
        #expect(throws: Failure.self) { try CallThreads.run(multiplyAdds: 0) { () throws -> Int in throw Failure() } }
        #expect(BLASThreads.current == 2, "a throwing call sets the threads back too")
    }

    @Test("a forward's multiply-adds: positions × the factor path's per position, |W| without one, elements when elementwise")
    func forwardMultiplyAdds() throws {
        var random = RandomSource(seed: 1)
        func module(_ algorithm: Algorithm, _ layer: LayerSpec, rank: Int) throws -> AdapterModule {
            let options = AdapterOptions(rank: rank, alpha: 1)
            return AdapterModule(name: "m", algorithm: try algorithm.makeAdapter(layer: layer, options: options, random: &random),
                                 options: options, baseWeight: nil, baseBias: nil)
        }
        // LoRA r4 on 64→32 over 5 rows of 3 tokens: 15 positions × (4·64 + 32·4).
        let lora = try module(.locon, .linear(inFeatures: 64, outFeatures: 32), rank: 4)
        #expect(lora.hasCheaperFactorPath)
        #expect(CallThreads.forwardMultiplyAdds(lora, inputShape: [5, 3, 64], elementwise: false) == 15 * (4 * 64 + 32 * 4))
        // LoRA r8 on 8→8 has no cheaper factor path: op(x, ΔW), 64 per position.
        let heavy = try module(.locon, .linear(inFeatures: 8, outFeatures: 8), rank: 8)
        #expect(!heavy.hasCheaperFactorPath)
        #expect(CallThreads.forwardMultiplyAdds(heavy, inputShape: [7, 8], elementwise: false) == 7 * 64)
        #expect(CallThreads.forwardMultiplyAdds(heavy, inputShape: [7, 8], elementwise: true) == 56)
        // An elementwise call with the layer's input (DoRA's side) computes the chain over that input.
        #expect(CallThreads.forwardMultiplyAdds(lora, inputShape: [5, 3, 32], elementwise: true, layerInputShape: [5, 3, 64])
                == 15 * (4 * 64 + 32 * 4))
    }
}
