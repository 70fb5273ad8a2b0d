import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// `lycoris convert`: an adapter file rewritten module by module — prefixes renamed
/// (`lycoris_…` ⇄ kohya's `lora_unet_…`), modules kept or dropped by regular expression,
/// float tensors re-typed (`alpha` stays a 0-dim F32, integer tensors keep their type), and
/// the 2-D `lora_up` LyCORIS 4.1.3's DyLoRA writes for convolutions (which it cannot read
/// back) reshaped to (out, r, 1, …) to match its N-D `lora_down`. Metadata is kept.
public enum AdapterConvert {
    public struct Options: Sendable {
        public var dtype: DType?
        /// Prefix rewrites, the first matching one applies: `from` at the start of a module
        /// name becomes `to`.
        public var renames: [(from: String, to: String)] = []
        /// Regular expressions: with `keep` given only matching modules stay; `drop` removes
        /// matching ones (after the rename).
        public var keep: [String] = []
        public var drop: [String] = []

        public init() {}
    }

    public struct Report: Sendable {
        public var written: [String] = []
        public var dropped: [String] = []
        public var renamed = 0
        /// Modules whose 2-D conv `lora_up` was reshaped.
        public var repaired: [String] = []
    }

    /// `progress(done, total)` follows the modules (written or dropped).
    public static func convert(input: String, output: String, options: Options,
                               progress: (Int, Int) -> Void = { _, _ in }) throws -> Report {
        let adapter = try AdapterFile(path: input)
        let raw = try SafetensorsFile(path: input)
        let keep = try options.keep.map { try Regex($0) }, drop = try options.drop.map { try Regex($0) }
        var report = Report()
        var writer = SafetensorsWriter(metadata: adapter.metadata)
        for (index, module) in adapter.modules.enumerated() {
            defer { progress(index + 1, adapter.modules.count) }
            var name = module.name
            if let rename = options.renames.first(where: { name.hasPrefix($0.from) }) {
                name = rename.to + name.dropFirst(rename.from.count)
                report.renamed += 1
            }
            let kept = (keep.isEmpty || keep.contains { name.contains($0) }) && !drop.contains { name.contains($0) }
            guard kept else {
                report.dropped.append(name)
                continue
            }
            let downRank = module.tensors["lora_down.weight"]?.shape.count ?? 0
            for suffix in module.suffixes {
                let info = module.tensors[suffix]!
                let key = KeySchema.key(module: name, suffix: suffix)
                var shape = info.shape
                if suffix == "lora_up.weight", shape.count == 2, downRank > 2 {
                    shape += Array(repeating: 1, count: downRank - 2)
                    report.repaired.append(name)
                }
                let target = suffix == "alpha" && info.dtype.isFloatingPoint ? DType.f32
                    : info.dtype.isFloatingPoint ? options.dtype ?? info.dtype : info.dtype
                let sourceKey = KeySchema.key(module: module.name, suffix: suffix)
                if target == info.dtype {
                    try writer.addRaw(key, dtype: info.dtype, shape: shape, bytes: try raw.rawBytes(sourceKey))
                } else {
                    try writer.add(key, try raw.tensor(sourceKey).reshaped(shape), as: target)
                }
            }
            report.written.append(name)
        }
        for key in adapter.strayKeys {
            let info = raw.info(key)!
            try writer.addRaw(key, dtype: info.dtype, shape: info.shape, bytes: try raw.rawBytes(key))
        }
        try writer.write(toPath: output)
        return report
    }
}
