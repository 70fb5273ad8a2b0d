import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// `lycoris extract`: the difference of two checkpoints of one model (base, tuned) as a
/// LyCORIS/kohya LoCon file, layer by layer with ``LowRankExtraction`` — what LyCORIS's
/// `extract_diff` does, on files rather than loaded models.
///
/// Layers: every Linear and Conv2d weight (2-D and 4-D) of the ``CheckpointLayers`` table,
/// text encoders optional; with mode `full` also the norms (stored as `w_norm`/`b_norm`).
/// Both checkpoints are memory-mapped and may be in different layouts; a layer is matched by
/// its kohya name. Only the layers being worked on are decoded: `workers` layers at a time,
/// each taken by the next free worker (largest first, so the long ones do not come last).
/// With more than one worker OpenBLAS is set to one thread for the process (the workers
/// are the parallelism; nested BLAS threads would only contend).
public enum CheckpointExtract {
    public struct Options: Sendable {
        public var extraction: LowRankExtraction.Options
        public var textEncoders = true
        public var dtype: DType = .f16
        public var family: ModelFamily?
        public var workers = max(1, ProcessInfo.processInfo.activeProcessorCount)

        public init(extraction: LowRankExtraction.Options) { self.extraction = extraction }
    }

    public struct LayerReport: Sendable {
        public var name: String
        public var shape: [Int]
        public var kind: LowRankExtraction.Result.Kind
        public var rank: Int?
        public var relativeError: Float
        public var seconds: Double
    }

    public struct Report: Sendable {
        public var family: ModelFamily?
        public var layers: [LayerReport] = []
        /// Tuned layers with no base layer of the same name and shape.
        public var unmatched: [String] = []
        public var parameters = 0
        public var bytes = 0
    }

    struct Job {
        var name: String
        var tuned: AdaptableLayer
        var base: AdaptableLayer
        var shape: [Int]
    }

    public static func extract(base basePath: String, tuned tunedPath: String, output: String, options: Options,
                               progress: @escaping @Sendable (Int, Int) -> Void = { _, _ in }) throws -> Report {
        let base = try Checkpoint(path: basePath), tuned = try Checkpoint(path: tunedPath)
        let tunedTable = try CheckpointLayers(tuned, family: options.family)
        let family = options.family ?? tunedTable.family
        let baseTable = try CheckpointLayers(base, family: family)
        var report = Report(family: family)
        var jobs: [Job] = []
        for layer in tunedTable.layers {
            let shape = rowShape(layer, in: tuned)
            let isMatrix = shape.count == 2 || shape.count == 4
            guard isMatrix || (options.extraction.mode == .full && shape.count == 1) else { continue }
            if !options.textEncoders, layer.component != .unet, layer.component != nil { continue }
            guard let match = baseTable.layer(named: layer.name), rowShape(match, in: base) == shape else {
                report.unmatched.append(layer.name)
                continue
            }
            jobs.append(Job(name: layer.name, tuned: layer, base: match, shape: shape))
        }
        let work = jobs
        // Largest first: the workers finish together.
        let sizes = work.map { $0.shape.reduce(1, *) }
        let order = sizes.indices.sorted { sizes[$0] > sizes[$1] }
        let results = ResultSlots(count: jobs.count)
        let workers = max(1, min(options.workers, work.count))
        if workers > 1 { BLASThreads.set(1) }
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            while let next = results.claim() {
                let index = order[next]
                let job = work[index]
                let start = Date()
                let outcome = Result { try extractLayer(job, base: base, tuned: tuned, options: options.extraction, seed: UInt64(index)) }
                results.store(index, outcome.map { ($0, Date().timeIntervalSince(start)) })
                progress(results.finished, work.count)
            }
        }

        var writer = SafetensorsWriter(metadata: metadata(options: options, family: family))
        for (job, slot) in zip(jobs, results.values) {
            let (result, seconds) = try slot!.get()
            report.layers.append(LayerReport(name: job.name, shape: job.shape, kind: result.kind, rank: result.rank,
                                             relativeError: result.relativeError, seconds: seconds))
            let isNorm = job.shape.count == 1
            for (suffix, tensor) in result.tensors {
                let stored = isNorm ? ["diff": "w_norm", "diff_b": "b_norm"][suffix] ?? suffix : suffix
                try writer.add(KeySchema.key(module: job.name, suffix: stored), tensor, as: options.dtype)
                if suffix != "alpha" { report.parameters += tensor.count }
            }
            for (suffix, values, shape) in result.integers {
                let bytes = values.flatMap { value in withUnsafeBytes(of: value.littleEndian) { Array($0) } }
                try writer.addRaw(KeySchema.key(module: job.name, suffix: suffix), dtype: .i16, shape: shape, bytes: bytes)
            }
        }
        try writer.write(toPath: output)
        report.bytes = writer.headerBytes().count + writer.entries.reduce(0) { $0 + $1.byteCount }
        return report
    }

    /// The layer's weight shape (a fused tensor's row block counted alone).
    static func rowShape(_ layer: AdaptableLayer, in checkpoint: Checkpoint) -> [Int] {
        var shape = checkpoint.parts[layer.part].file.info(layer.weightKey)?.shape ?? []
        if let rows = layer.rows, !shape.isEmpty { shape[0] = rows.count }
        return shape
    }

    /// A layer's weight (rows) and bias (rows) from one checkpoint.
    static func load(_ layer: AdaptableLayer, from checkpoint: Checkpoint) throws -> (weight: Tensor, bias: Tensor?) {
        func rows(_ tensor: Tensor) -> Tensor { layer.rows.map { tensor.rows($0) } ?? tensor }
        let weight = rows(try checkpoint.parts[layer.part].file.tensor(layer.weightKey))
        let bias = try layer.biasPart.flatMap { part in try layer.biasKey.map { rows(try checkpoint.parts[part].file.tensor($0)) } }
        return (weight, bias)
    }

    /// Hands the mapped pages of a layer's weight back once it is decoded
    /// (``SafetensorsFile/releasePages(_:)``), so the resident set stays the layers in
    /// flight, not both files.
    static func release(_ layer: AdaptableLayer, in checkpoint: Checkpoint) {
        checkpoint.parts[layer.part].file.releasePages(layer.weightKey)
    }

    static func extractLayer(_ job: Job, base: Checkpoint, tuned: Checkpoint, options: LowRankExtraction.Options,
                             seed: UInt64) throws -> LowRankExtraction.Result {
        let (baseWeight, baseBias) = try load(job.base, from: base)
        let (tunedWeight, tunedBias) = try load(job.tuned, from: tuned)
        release(job.base, in: base)
        release(job.tuned, in: tuned)
        if LowRankExtraction.isUnchanged(base: baseWeight, tuned: tunedWeight) {
            return LowRankExtraction.Result(kind: .unchanged)
        }
        let biasDelta: Tensor? = if let tunedBias, let baseBias { tunedBias - baseBias } else { nil }
        return try LowRankExtraction.extract(delta: tunedWeight - baseWeight, biasDelta: biasDelta, options: options, seed: seed)
    }

    /// kohya metadata (`ss_network_module`, dim/alpha, `ss_network_args` with LyCORIS's algo)
    /// and the extraction settings.
    static func metadata(options: Options, family: ModelFamily?) -> [String: String] {
        let e = options.extraction
        func number(_ value: Float) -> String { value == value.rounded() ? String(Int(value)) : String(value) }
        var arguments: [String: String] = ["algo": "locon", "use_tucker": String(e.tucker)]
        if e.mode == .fixed { arguments["conv_dim"] = number(e.convParameter); arguments["conv_alpha"] = number(e.convParameter) }
        let json = arguments.sorted { $0.key < $1.key }.map { "\"\($0.key)\": \"\($0.value)\"" }.joined(separator: ", ")
        var result = [
            "ss_network_module": "lycoris.kohya", "ss_network_args": "{\(json)}",
            "lycoris_extract_mode": e.mode.rawValue, "lycoris_extract_linear": number(e.linearParameter),
            "lycoris_extract_conv": number(e.convParameter), "lycoris_extract_sparse_bias": String(e.sparseBias),
            "lycoris_extract_svd": e.mode == .fixed && !e.exact ? "randomized" : "exact",
        ]
        if e.mode == .fixed { result["ss_network_dim"] = number(e.linearParameter); result["ss_network_alpha"] = number(e.linearParameter) }
        if e.sparseBias { result["lycoris_extract_sparsity"] = number(e.sparsity) }
        if let family {
            result["ss_base_model_version"] = family.baseModelVersion
            result["ss_v2"] = String(family == .sd2)
        }
        return result
    }
}

/// Work handed out to the extraction workers, and their results, under one lock.
final class ResultSlots: @unchecked Sendable {
    private let lock = NSLock()
    private var nextJob = 0
    private(set) var values: [Result<(LowRankExtraction.Result, Double), any Error>?]

    init(count: Int) { values = Array(repeating: nil, count: count) }

    /// The next job's position in the work order, or nil when all are taken.
    func claim() -> Int? {
        lock.withLock {
            guard nextJob < values.count else { return nil }
            defer { nextJob += 1 }
            return nextJob
        }
    }

    func store(_ index: Int, _ value: Result<(LowRankExtraction.Result, Double), any Error>) {
        lock.withLock { values[index] = value }
    }

    var finished: Int { lock.withLock { values.count { $0 != nil } } }
}
