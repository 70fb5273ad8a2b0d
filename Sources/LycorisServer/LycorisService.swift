import Foundation
import Logging
import LycorisAlgorithms
import LycorisCore
import LycorisCUDA
import LycorisDevice
import LycorisRPC

/// The server's state and its methods. One instance serves one client over one stream;
/// calls are handled one at a time, in order (BLAS uses its own thread pool inside a call).
///
/// Lifecycle: `initialize` → `arena.create` (optional) → `network.create` (then optionally
/// `network.load` of a file's weights) → forward/backward, parameters, optimizer, save… →
/// `shutdown` (or stdin EOF).
public final class LycorisService {
    public static let protocolVersion = "1.0"
    public static let serverVersion = LycorisVersion.string

    let logger: Logger
    /// The directory new arenas are created in.
    let arenaDirectory: String
    var initialized = false
    /// Set by `shutdown`: the transport exits after sending the reply.
    public private(set) var shutdownRequested = false

    var transport = TensorTransport()
    var network: Network?
    var random = RandomSource(seed: 0)
    /// Forward calls kept for their backward: tape id → (module, input, choices).
    var pending: [Int64: PendingCall] = [:]
    var nextTape: Int64 = 1
    /// Gradients accumulated by backward calls, by module then parameter.
    var gradients: [String: ParameterSet] = [:]
    var optimizer: OptimizerSettings?
    /// The CUDA libraries found by the last `initialize {cuda: …}` (nil until one asks).
    var cuda: CUDAEnvironment?
    /// The CUDA compute backend over that probe (each device's math made on first use).
    var cudaBackend: CUDABackend?
    /// The device network's session (`network.create`/`network.bind` with a device); nil on the CPU.
    var deviceSession: DeviceSession?
    /// Whether the test device `emulated` is accepted (`LYCORIS_EMULATED_DEVICE=1`).
    let emulatedDeviceEnabled: Bool

    /// The most forward calls awaiting backward at once.
    static let maximumPending = 1 << 16

    struct PendingCall {
        enum Kind { case delta, full, deltaWeight, elementwise }
        let module: String
        /// The forward's input (empty for ΔW calls; the scaled tensor for elementwise calls, or
        /// what DoRA's factor path saved for its backward).
        let input: Tensor
        /// The layer input of an elementwise call with side output_with_input (DoRA).
        var layerInput: Tensor? = nil
        let tape: AdapterModule.Tape
        /// What the call returned: Δ(x), the whole output, ΔW, or the elementwise transfer's
        /// adapted tensor — which backward applies.
        let kind: Kind
    }

    public init(arenaDirectory: String = "/dev/shm", logger: Logger = Logger(label: "lycoris-server"),
                emulatedDevice: Bool = ProcessInfo.processInfo.environment["LYCORIS_EMULATED_DEVICE"] == "1") {
        self.arenaDirectory = arenaDirectory
        self.logger = logger
        self.emulatedDeviceEnabled = emulatedDevice
    }

    /// Methods callable before `initialize`.
    static let preInitialization: Set<String> = ["initialize", "rpc.discover", "shutdown"]

    /// Dispatches one call (the JSON-RPC layer turns thrown ``RPCError``s into error responses).
    public func handle(method: String, params: JSONValue?) throws -> JSONValue {
        guard let implementation = Self.methods[method] else { throw RPCError.methodNotFound(method) }
        if !initialized && !Self.preInitialization.contains(method) { throw RPCError.notInitialized(method) }
        do {
            return try implementation(self)(Params(params))
        } catch let error as RPCError {
            logger.debug("\(method) failed: \(error.message)")
            throw error
        } catch let error as AdapterError {
            throw RPCError.adapter(error.description)
        }
    }

    /// Every method, by name.
    static let methods: [String: @Sendable (LycorisService) -> (Params) throws -> JSONValue] = [
        "initialize": { $0.initialize },
        "shutdown": { $0.shutdown },
        "rpc.discover": { $0.discover },
        "arena.create": { $0.arenaCreate },
        "arena.resize": { $0.arenaResize },
        "arena.release": { $0.arenaRelease },
        "network.create": { $0.networkCreate },
        "network.info": { $0.networkInfo },
        "network.save": { $0.networkSave },
        "network.load": { $0.networkLoad },
        "file.describe": { $0.fileDescribe },
        "network.suggest": { $0.networkSuggest },
        "network.set_multiplier": { $0.networkSetMultiplier },
        "network.set_training": { $0.networkSetTraining },
        "network.set_timestep_mask": { $0.networkSetTimestepMask },
        "network.seed": { $0.networkSeed },
        "forward": { $0.forward },
        "backward": { $0.backward },
        "delta_weight": { $0.deltaWeight },
        "delta_weight_backward": { $0.deltaWeightBackward },
        "tapes.release": { $0.tapesRelease },
        "network.bind": { $0.networkBind },
        "network.delta_weights": { $0.networkDeltaWeights },
        "network.delta_weights_backward": { $0.networkDeltaWeightsBackward },
        "device.release": { $0.deviceRelease },
        "parameters.get": { $0.parametersGet },
        "parameters.set": { $0.parametersSet },
        "gradients.get": { $0.gradientsGet },
        "gradients.zero": { $0.gradientsZero },
        "optimizer.create": { $0.optimizerCreate },
        "optimizer.step": { $0.optimizerStep },
        "optimizer.save": { $0.optimizerSave },
        "optimizer.load": { $0.optimizerLoad },
    ]

    // MARK: Lifecycle

    func initialize(_ p: Params) throws -> JSONValue {
        if p.has("protocol_version") {
            let requested = try p.string("protocol_version")
            guard requested.split(separator: ".").first == Self.protocolVersion.split(separator: ".").first else {
                throw RPCError.invalidParams("protocol_version \(requested) is not compatible with \(Self.protocolVersion)", path: "protocol_version")
            }
        }
        if p.has("client") {
            let client = try p.string("client")
            logger.info("client: \(client)")
        }
        var capabilities: JSONObject = [
            "algorithms": .array(Algorithm.allCases.map { .string($0.rawValue) }),
            "layer_kinds": ["linear", "conv1d", "conv2d", "conv3d", "layer_norm", "group_norm"],
            "dtypes": .array(TensorTransport.wireDTypes.map { .string($0.rawValue) }),
            "save_dtypes": ["F32", "F16", "BF16"],
            "framings": ["ndjson", "content-length"],
            "arena": ["directory": .string(arenaDirectory), "maximum_size": .integer(Int64(Arena.maximumSize))],
            "base64": true,
            "optimizers": .array(Optimizer.Kind.allCases.map { .string($0.rawValue) }),
            "blas_threads": .integer(Int64(BLASThreads.current)),
            "call_record": Self.callRecordCapability,
        ]
        if p.has("cuda") { capabilities["cuda"] = try probeCUDA(p) }
        if emulatedDeviceEnabled { capabilities["emulated_device"] = true }
        initialized = true
        return [
            "server": ["name": "lycoris-server", "version": .string(Self.serverVersion)],
            "protocol_version": .string(Self.protocolVersion),
            "capabilities": .object(capabilities),
        ]
    }

    func shutdown(_ p: Params) throws -> JSONValue {
        shutdownRequested = true
        releaseAll()
        return .null
    }

    /// Drops the network, pending calls and the arena (unlinking its file).
    public func releaseAll() {
        deviceSession?.close()
        deviceSession = nil
        pending.removeAll()
        network = nil
        transport.arena = nil
    }

    func discover(_ p: Params) throws -> JSONValue {
        try JanssonCodec.decode(Array(OpenRPCDocument.text.utf8))
    }

    // MARK: Arena

    func arenaCreate(_ p: Params) throws -> JSONValue {
        guard transport.arena == nil else { throw RPCError.state("an arena exists already; use arena.resize or arena.release") }
        let arena = try Arena(directory: try p.string("directory", default: arenaDirectory), size: try p.int("size"))
        transport.arena = arena
        return ["path": .string(arena.path), "size": .integer(Int64(arena.size))]
    }

    func arenaResize(_ p: Params) throws -> JSONValue {
        guard let arena = transport.arena else { throw RPCError.arena("no arena: call arena.create first") }
        try arena.resize(to: try p.int("size"))
        return ["path": .string(arena.path), "size": .integer(Int64(arena.size))]
    }

    func arenaRelease(_ p: Params) throws -> JSONValue {
        guard transport.arena != nil else { throw RPCError.arena("no arena to release") }
        transport.arena = nil
        return .null
    }

    // MARK: Helpers

    func requireNetwork() throws -> Network {
        guard let network else { throw RPCError.state("no network: call network.create first") }
        return network
    }

    func module(_ name: String) throws -> AdapterModule {
        guard let module = try requireNetwork()[name] else { throw RPCError.unknownModule(name) }
        return module
    }
}
