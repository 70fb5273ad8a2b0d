import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats

/// `lycoris resize`: new ranks for the LoRA/LoCon/DyLoRA modules of an adapter file, by the
/// SVD of each module's product M = up·down (with a Tucker core, up·(mid ⋆ down)), as kohya's
/// `networks/resize_lora.py` does:
///
/// - rank r' = `--rank` N, or by a dynamic rule on M's singular values S (index + 1, the
///   index clamped to [1, len(S) − 1], r' then capped at N):
///   `sv_ratio` t: #{S_i > S₁/t}; `sv_cumulative` t: the position where the cumulative
///   ΣS_i/ΣS reaches t; `sv_fro` t: where the cumulative ΣS_i²/ΣS² reaches t²;
///   r' = 1 when S₁ ≤ 1e-6;
/// - `lora_up` = U[:, :r']·S[:r'], `lora_down` = Vt[:r'] (a conv's kernel on `lora_down`,
///   no Tucker core), `alpha` = (alpha/r)·r' so ΔW = (alpha'/r')·up'·down' keeps the scale;
/// - retained energy: ΣS[:r']/ΣS (sum) and √(ΣS[:r']²/ΣS²) (Frobenius), and S₁/S_r'.
///
/// M's SVD is taken through the factors: up = Uu·Su·Vuᵀ, down = Ud·Sd·Vdᵀ (thin SVDs of an
/// (out, r) and an (r, n) matrix), C = Su·Vuᵀ·Ud·Sd (r, r) = Uc·S·Vcᵀ, so M = (Uu·Uc)·S·(Vcᵀ·Vdᵀ)
/// — exact, and O((out + n)·r²) instead of O(out·n·min(out, n)).
/// Modules of other algorithms are copied unchanged; metadata is kept, with kohya's
/// `ss_network_dim`/`ss_network_alpha`/`ss_training_comment` amended and the now stale
/// `sshs_*` hashes dropped.
public enum AdapterResize {
    public enum Rule: Sendable, Equatable {
        case fixed
        case svRatio(Float), svCumulative(Float), svFro(Float)
    }

    public struct ModuleReport: Sendable {
        public var name: String
        public var oldRank: Int
        public var newRank: Int
        public var newAlpha: Float
        public var sumRetained: Float
        public var froRetained: Float
        public var maxRatio: Float
    }

    public struct Report: Sendable {
        public var resized: [ModuleReport] = []
        /// Modules copied as they were (other algorithms), with their algorithm.
        public var kept: [(name: String, algorithm: String)] = []
    }

    /// kohya's rank for singular values `s` (descending) under `rule`, capped at `maxRank`.
    public static func newRank(_ s: [Float], rule: Rule, maxRank: Int) -> Int {
        func clampIndex(_ index: Int) -> Int { max(1, min(index, s.count - 1)) }
        /// torch.searchsorted (left): the first position whose value is ≥ target.
        func searchsorted(_ values: [Float], _ target: Float) -> Int { values.firstIndex { $0 >= target } ?? values.count }
        var rank: Int
        switch rule {
        case .fixed: rank = maxRank
        case .svRatio(let t):
            let floor = (s.first ?? 0) / t
            rank = clampIndex(s.filter { $0 > floor }.count) + 1
        case .svCumulative(let t):
            let total = s.reduce(0, +)
            var sum: Float = 0
            rank = clampIndex(searchsorted(s.map { sum += $0; return sum / total }, t) + 1) + 1
        case .svFro(let t):
            let total = s.reduce(0) { $0 + $1 * $1 }
            var sum: Float = 0
            rank = clampIndex(searchsorted(s.map { sum += $0 * $0; return sum / total }, t * t) + 1) + 1
        }
        if (s.first ?? 0) <= 1e-6 { return 1 }
        return min(rank, maxRank, s.count)
    }

    /// `progress(done, total)` follows the modules.
    public static func resize(input: String, output: String, rank maxRank: Int, rule: Rule, dtype: DType?,
                              progress: (Int, Int) -> Void = { _, _ in }) throws -> Report {
        let adapter = try AdapterFile(path: input)
        let raw = try SafetensorsFile(path: input)
        var report = Report()
        var writer = SafetensorsWriter(metadata: adapter.metadata)
        var lastAlpha: Float = 0
        for (index, module) in adapter.modules.enumerated() {
            defer { progress(index + 1, adapter.modules.count) }
            let tensors = try adapter.tensors(of: module)
            guard module.algorithm == .locon || module.algorithm == .dylora, let up = tensors["lora_up.weight"],
                  let down = tensors["lora_down.weight"] else {
                report.kept.append((module.name, module.algorithm?.rawValue ?? "unknown"))
                for suffix in module.suffixes {
                    let info = module.tensors[suffix]!
                    let target = dtype.flatMap { info.dtype.isFloatingPoint ? $0 : nil }
                    let key = KeySchema.key(module: module.name, suffix: suffix)
                    if let target, target != info.dtype {
                        try writer.add(key, tensors[suffix]!, as: target)
                    } else {
                        try writer.addRaw(key, dtype: info.dtype, shape: info.shape, bytes: try raw.rawBytes(key))
                    }
                }
                continue
            }
            let rank = up.shape[1]
            let scale = (module.alpha ?? Float(rank)) / Float(rank)
            let out = up.shape[0]
            // M = up · down_effective, (out, n).
            var effectiveDown = down.reshaped([down.shape[0], down.count / down.shape[0]])
            var kernel = Array(down.shape.dropFirst(2))
            if let mid = tensors["lora_mid.weight"] {
                effectiveDown = LowRankExtraction.tuckerDown(mid: mid, down: effectiveDown)
                kernel = Array(mid.shape.dropFirst(2))
            }
            let inChannels = down.shape.count > 1 ? down.shape[1] : 1
            let svd = try productSVD(up: up.reshaped([out, rank]), down: effectiveDown)
            let newRank = newRank(svd.s, rule: rule, maxRank: maxRank)
            let (newUp, newDown) = svd.factors(rank: newRank)
            let alpha = scale * Float(newRank)
            lastAlpha = alpha
            let storage = dtype ?? module.tensors["lora_down.weight"]!.dtype
            try writer.add(KeySchema.key(module: module.name, suffix: "lora_down.weight"),
                           newDown.reshaped([newRank, inChannels] + kernel), as: storage)
            try writer.add(KeySchema.key(module: module.name, suffix: "lora_up.weight"),
                           newUp.reshaped([out, newRank] + kernel.map { _ in 1 }), as: storage)
            try writer.add(KeySchema.key(module: module.name, suffix: "alpha"), Tensor(scalar: alpha), as: storage)
            // A sparse bias (ΔW = s·(up·down + S)) stays as it is: s is kept.
            for suffix in SparseBias.suffixes where module.tensors[suffix] != nil {
                let key = KeySchema.key(module: module.name, suffix: suffix), info = module.tensors[suffix]!
                try writer.addRaw(key, dtype: info.dtype, shape: info.shape, bytes: try raw.rawBytes(key))
            }
            let total = svd.s.reduce(0, +), squares = svd.s.reduce(0) { $0 + $1 * $1 }
            let kept = svd.s.prefix(newRank)
            report.resized.append(ModuleReport(
                name: module.name, oldRank: rank, newRank: newRank, newAlpha: alpha,
                sumRetained: total > 0 ? kept.reduce(0, +) / total : 1,
                froRetained: squares > 0 ? (kept.reduce(0) { $0 + $1 * $1 } / squares).squareRoot() : 1,
                maxRatio: svd.s[newRank - 1] > 0 ? svd.s[0] / svd.s[newRank - 1] : .infinity))
        }
        let oldDim = report.resized.first.map { String($0.oldRank) } ?? "?"
        let comment = adapter.metadata["ss_training_comment"] ?? ""
        if rule == .fixed {
            writer.metadata["ss_training_comment"] = "dimension is resized from \(oldDim) to \(maxRank); \(comment)"
            writer.metadata["ss_network_dim"] = String(maxRank)
            writer.metadata["ss_network_alpha"] = String(lastAlpha)
        } else {
            writer.metadata["ss_training_comment"] = "Dynamic resize with \(rule) from \(oldDim); \(comment)"
            writer.metadata["ss_network_dim"] = "Dynamic"
            writer.metadata["ss_network_alpha"] = "Dynamic"
        }
        writer.metadata["sshs_model_hash"] = nil
        writer.metadata["sshs_legacy_hash"] = nil
        try writer.write(toPath: output)
        return report
    }

    /// The SVD of up·down from the factors' thin SVDs (see the type's documentation).
    static func productSVD(up: Tensor, down: Tensor) throws -> SingularValueDecomposition {
        let u = try up.singularValueDecomposition(), d = try down.singularValueDecomposition()
        // C = Su·Vuᵀ·Ud·Sd: (k1, r)·(r, k2) with rows scaled by Su and columns by Sd.
        var core = Tensor.matmul(u.vt, d.u)
        let columns = core.shape[1]
        for row in 0..<core.shape[0] {
            for column in 0..<columns { core.scalars[row * columns + column] *= u.s[row] * d.s[column] }
        }
        let c = try core.singularValueDecomposition()
        return SingularValueDecomposition(u: Tensor.matmul(u.u, c.u), s: c.s, vt: Tensor.matmul(c.vt, d.vt))
    }
}
