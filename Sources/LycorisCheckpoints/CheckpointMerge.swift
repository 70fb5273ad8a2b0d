import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// Merges adapters into a checkpoint and writes it in the input's layout (a single file, or
/// a diffusers folder with the same files and shards):
///
///     W' = W0 + Σ_i (merged_i(W0) − W0),   merged_i(W0) = W0 + m_i·ΔW_i   (forward semantics)
///
/// — every adapter is taken against the *original* weight (for the additive algorithms this
/// is W0 + Σ m_i·ΔW_i; for ones whose ΔW depends on W0, such as DoRA or OFT, none sees
/// another's change), and the same for biases of algorithms that adapt them (norm). Modules
/// are found by their kohya names in the ``CheckpointLayers`` table (an OpenCLIP `q_proj`
/// merges into its third of the fused `in_proj`).
///
/// The output is streamed: each file's header is written first (names, dtypes and shapes are
/// the input's), then tensor by tensor in file order, each merged or re-typed one computed
/// just before its bytes are written from the memory-mapped input, whose pages are handed
/// back after use — the resident set is a few layers, not the checkpoint. A file goes to a
/// temporary file renamed over the output, a folder to a temporary folder renamed into
/// place, so a failed job leaves no output.
public enum CheckpointMerge {
    /// An adapter file and its multiplier m.
    public struct Adapter: Sendable {
        public var path: String
        public var multiplier: Float
        public init(path: String, multiplier: Float) {
            self.path = path
            self.multiplier = multiplier
        }
    }

    public struct Report: Sendable {
        public struct Merged: Sendable {
            public var adapter: String, module: String, key: String, rows: Range<Int>?, algorithm: Algorithm
        }
        public var family: ModelFamily?
        public var layout: Checkpoint.Layout
        public var merged: [Merged] = []
        /// Bias keys merged too (norm modules).
        public var mergedBiases: [String] = []
        /// (adapter, module) of modules naming no layer of the checkpoint.
        public var unmatched: [(adapter: String, module: String)] = []
        public var failed: [(adapter: String, module: String, reason: String)] = []
        /// How names were looked for (``CheckpointLayers/namingDescription``).
        public var lookedFor: String
        /// False when `strict` refused to write.
        public var written = false
        /// Tensors written, and the files they went to.
        public var tensorCount = 0
        public var files: [String] = []
    }

    /// One planned application: this adapter's module on this layer.
    struct Application {
        var adapter: Int
        var module: AdapterFile.Module
        var layer: AdaptableLayer
    }

    /// Merges and writes `output`; with `strict`, unmatched or failed modules mean nothing is
    /// written (``Report/written`` false). `progress(done, total)` follows the tensors written
    /// (copied ones too: on a real checkpoint the copying is most of the time).
    public static func merge(checkpoint path: String, adapters: [Adapter], output: String, dtype: DType? = nil,
                             family: ModelFamily? = nil, strict: Bool = false,
                             progress: @escaping (Int, Int) -> Void = { _, _ in }) throws -> Report {
        guard !adapters.isEmpty else { throw CheckpointError("no adapter to merge") }
        for adapter in adapters where !adapter.multiplier.isFinite {
            throw CheckpointError("\(adapter.path): the multiplier must be finite")
        }
        if let dtype, !dtype.isEncodable { throw CheckpointError("output dtype \(dtype.rawValue) is not a float type (F32, F16, BF16, F64)") }
        let checkpoint = try Checkpoint(path: path)
        let table = try CheckpointLayers(checkpoint, family: family)
        let files = try adapters.map { try AdapterFile(path: $0.path) }
        var report = Report(family: table.family, layout: checkpoint.layout, lookedFor: table.namingDescription)

        // Plan: which modules apply to which weight (part, key).
        var byWeight: [String: [Application]] = [:]
        for (index, file) in files.enumerated() {
            for module in file.modules {
                guard let layer = table.layer(named: module.name) else {
                    report.unmatched.append((adapters[index].path, module.name))
                    continue
                }
                byWeight[location(layer.part, layer.weightKey), default: []].append(Application(adapter: index, module: module, layer: layer))
            }
        }
        if strict && !report.unmatched.isEmpty { return report }

        let layers = MergedLayers(checkpoint: checkpoint, adapters: adapters, files: files, byWeight: byWeight, strict: strict)
        do {
            try write(checkpoint, layers, dtype: dtype, to: output, report: &report, progress: progress)
        } catch is MergedLayers.StrictFailure {
            layers.finish(into: &report)
            return report
        }
        layers.finish(into: &report)
        report.written = true
        return report
    }

    static func location(_ part: Int, _ key: String) -> String { "\(part)/\(key)" }

    /// The merged weights and biases, computed one layer at a time when the writer reaches
    /// the first of its tensors; the other one (a norm's weight when its bias comes first in
    /// the file, or the bias) is kept until its turn. Used by one writer on one thread.
    final class MergedLayers: @unchecked Sendable {
        /// Thrown by a producer when `strict` and a module failed: the write stops, nothing is kept.
        struct StrictFailure: Error {}

        let checkpoint: Checkpoint
        let adapters: [Adapter]
        let files: [AdapterFile]
        let byWeight: [String: [Application]]
        /// Bias location → its layer's weight location.
        let weightOfBias: [String: String]
        let strict: Bool
        /// Results not yet written (nil: that bias is unchanged and written as it is).
        private var pending: [String: Tensor?] = [:]
        /// Report lines by weight location, put in location order by ``finish(into:)``.
        private var merged: [String: [Report.Merged]] = [:]
        private var failed: [String: [(adapter: String, module: String, reason: String)]] = [:]
        private var mergedBiases: [String: String] = [:]

        init(checkpoint: Checkpoint, adapters: [Adapter], files: [AdapterFile], byWeight: [String: [Application]], strict: Bool) {
            self.checkpoint = checkpoint
            self.adapters = adapters
            self.files = files
            self.byWeight = byWeight
            self.strict = strict
            var weightOfBias: [String: String] = [:]
            for (weightLocation, applications) in byWeight {
                let layer = applications[0].layer
                if let part = layer.biasPart, let key = layer.biasKey { weightOfBias[location(part, key)] = weightLocation }
            }
            self.weightOfBias = weightOfBias
        }

        /// Whether the tensor at `location` may change (a merged weight, or the bias of one).
        func adapts(_ location: String) -> Bool { byWeight[location] != nil || weightOfBias[location] != nil }

        /// The merged tensor at `location`, or nil for a bias no module changed.
        func take(_ location: String) throws -> Tensor? {
            if pending[location] == nil {
                try compute(byWeight[location] != nil ? location : weightOfBias[location]!)
            }
            return pending.removeValue(forKey: location)!
        }

        /// Computes one layer: every application against the original weight, changes summed.
        private func compute(_ weightLocation: String) throws {
            let applications = byWeight[weightLocation]!
            let layer = applications[0].layer
            let baseFile = checkpoint.parts[layer.part].file
            let original = try baseFile.tensor(layer.weightKey)
            let biasFile = layer.biasPart.map { checkpoint.parts[$0].file }
            let originalBias = try biasFile.flatMap { file in try layer.biasKey.map { try file.tensor($0) } }
            baseFile.releasePages(layer.weightKey)
            var (weight, bias) = (original, originalBias)
            var biasMerged = false
            for application in applications {
                let rows = application.layer.rows
                let adapterName = adapters[application.adapter].path
                do {
                    guard baseFile.info(layer.weightKey)?.dtype.isFloatingPoint == true else {
                        throw CheckpointError("base weight \(layer.weightKey) is not a float tensor")
                    }
                    guard let algorithm = application.module.algorithm else {
                        throw AdapterError("no known algorithm has the keys \(application.module.tensors.keys.sorted())")
                    }
                    let baseWeight = rows.map { original.rows($0) } ?? original
                    let baseBias = rows.flatMap { r in originalBias.map { $0.rows(r) } } ?? originalBias
                    let (result, newBias) = try AdapterMerge.mergedLayer(
                        application.module, of: files[application.adapter], baseWeight: baseWeight, weightKey: layer.weightKey,
                        baseBias: baseBias, multiplier: adapters[application.adapter].multiplier)
                    if newBias != nil && baseBias == nil {
                        throw CheckpointError("the adapter changes a bias, but \(layer.weightKey) has none in the checkpoint")
                    }
                    weight.addRows(rows, result - baseWeight)
                    if let newBias, let baseBias {
                        bias?.addRows(rows, newBias - baseBias)
                        biasMerged = true
                    }
                    merged[weightLocation, default: []].append(
                        .init(adapter: adapterName, module: application.module.name, key: layer.weightKey, rows: rows, algorithm: algorithm))
                } catch {
                    failed[weightLocation, default: []].append((adapterName, application.module.name, "\(error)"))
                }
            }
            if strict && failed[weightLocation] != nil { throw StrictFailure() }
            pending[weightLocation] = weight
            if let part = layer.biasPart, let key = layer.biasKey {
                let biasLocation = location(part, key)
                if biasMerged, let bias {
                    pending[biasLocation] = .some(bias)
                    mergedBiases[weightLocation] = key
                } else {
                    pending[biasLocation] = .some(nil)
                }
            }
        }

        /// Puts the report lines into `report` in weight-location order.
        func finish(into report: inout Report) {
            for location in byWeight.keys.sorted() {
                report.merged += merged[location] ?? []
                report.failed += failed[location] ?? []
                if let bias = mergedBiases[location] { report.mergedBiases.append(bias) }
            }
        }
    }

    /// Streams every part with the merged tensors in place (others byte for byte, or converted
    /// to `dtype`), in the checkpoint's layout.
    static func write(_ checkpoint: Checkpoint, _ layers: MergedLayers, dtype: DType?, to output: String,
                      report: inout Report, progress: @escaping (Int, Int) -> Void) throws {
        /// Tensors written so far, reported through `progress` (one writer, one thread).
        final class Progress: @unchecked Sendable {
            var done = 0
            let total: Int, report: (Int, Int) -> Void
            init(total: Int, report: @escaping (Int, Int) -> Void) { (self.total, self.report) = (total, report) }
            func step() { done += 1; report(done, total) }
        }
        let count = Progress(total: checkpoint.parts.reduce(0) { $0 + $1.file.tensors.count }, report: progress)
        func writePart(_ index: Int, to path: String) throws {
            let file = checkpoint.parts[index].file
            var writer = SafetensorsWriter(metadata: file.metadata)
            for info in file.tensors {
                let target = info.dtype.isFloatingPoint ? dtype ?? info.dtype : info.dtype
                let tensorLocation = location(index, info.name)
                let adapted = layers.adapts(tensorLocation)
                try writer.addStreamed(info.name, dtype: target, shape: info.shape) { sink in
                    if adapted, let tensor = try layers.take(tensorLocation) {
                        try SafetensorsWriter.streamFloats(tensor.scalars, as: target, into: sink)
                    } else if target != info.dtype {
                        try SafetensorsWriter.streamFloats(try file.tensor(info.name).scalars, as: target, into: sink)
                    } else {
                        try file.withRawBytes(info.name, sink)
                    }
                    file.releasePages(info.name)
                    count.step()
                }
            }
            try writer.write(toPath: path)
            report.tensorCount += file.tensors.count
        }
        switch checkpoint.layout {
        case .singleFile:
            try writePart(0, to: output)
            report.files = [output]
        case .diffusersFolder:
            let manager = FileManager.default
            guard !manager.fileExists(atPath: output) else {
                throw CheckpointError("\(output) exists; a merged diffusers folder is written to a new path")
            }
            let parent = (output as NSString).deletingLastPathComponent
            let temporary = (parent.isEmpty ? "." : parent) + "/." + (output as NSString).lastPathComponent + ".tmp-\(getpid())"
            try? manager.removeItem(atPath: temporary)
            do {
                try copyTree(checkpoint.path, to: temporary, skipping: Set(checkpoint.parts.map(\.relativePath)))
                for (index, part) in checkpoint.parts.enumerated() {
                    try writePart(index, to: temporary + "/" + part.relativePath)
                    report.files.append(output + "/" + part.relativePath)
                }
                try manager.moveItem(atPath: temporary, toPath: output)
            } catch {
                try? manager.removeItem(atPath: temporary)
                report.files = []
                throw error
            }
        }
    }

    /// Copies the folder `source` to `destination`, leaving out the relative paths in `skipping`.
    static func copyTree(_ source: String, to destination: String, skipping: Set<String>, relative: String = "") throws {
        let manager = FileManager.default
        try manager.createDirectory(atPath: destination, withIntermediateDirectories: false)
        for name in try manager.contentsOfDirectory(atPath: source) {
            let path = relative.isEmpty ? name : relative + "/" + name
            var isDirectory: ObjCBool = false
            _ = manager.fileExists(atPath: source + "/" + name, isDirectory: &isDirectory)
            if isDirectory.boolValue {
                try copyTree(source + "/" + name, to: destination + "/" + name, skipping: skipping, relative: path)
            } else if !skipping.contains(path) {
                try manager.copyItem(atPath: source + "/" + name, toPath: destination + "/" + name)
            }
        }
    }
}

extension Tensor {
    /// The rows `range` of the first axis.
    func rows(_ range: Range<Int>) -> Tensor {
        let stride = Array(shape.dropFirst()).product
        var newShape = shape
        newShape[0] = range.count
        return Tensor(shape: newShape, scalars: Array(scalars[range.lowerBound * stride..<range.upperBound * stride]))
    }

    /// Adds `delta` to the rows `range` (all rows when nil).
    mutating func addRows(_ range: Range<Int>?, _ delta: Tensor) {
        let stride = Array(shape.dropFirst()).product
        let start = (range?.lowerBound ?? 0) * stride
        for index in 0..<delta.count { scalars[start + index] += delta.scalars[index] }
    }
}
