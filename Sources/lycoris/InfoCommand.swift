import ArgumentParser
import Foundation
import LycorisAlgorithms
import LycorisCore

/// `lycoris info FILE [--json]`: per module the algorithm, rank, alpha, dtype, parameter
/// count and tensor shapes; totals; the file's `__metadata__`.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Describe an adapter file.")

    @Argument(help: "A .safetensors adapter file.")
    var file: String

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    @Flag(help: "Show whole module names and metadata values on lines as long as they need (the table otherwise fits 100 columns).")
    var wide = false

    func run() throws {
        let adapter = try AdapterFile(path: file)
        if json {
            try JobOutput.printJSON(Self.jsonObject(adapter))
        } else {
            print(Self.table(adapter, wide: wide))
        }
    }

    /// The algorithm shown for a module: detected from its keys, except that LoRA-keyed
    /// modules of a file whose kohya metadata declares DyLoRA (`ss_network_args` algo) are
    /// shown as DyLoRA — DyLoRA files carry plain LoRA keys. A module with `dora_scale` is
    /// shown as `<algo>+dora`.
    static func algorithmName(_ module: AdapterFile.Module, in adapter: AdapterFile) -> String {
        guard let detected = module.algorithm else { return "unknown" }
        let dora = module.doraAxis == nil ? "" : "+dora"
        if detected == .locon, declaredAlgorithm(adapter) == Algorithm.dylora.rawValue { return Algorithm.dylora.rawValue + dora }
        return detected.rawValue + dora
    }

    /// `algo` from the kohya `ss_network_args` JSON metadata, if present.
    static func declaredAlgorithm(_ adapter: AdapterFile) -> String? {
        guard let text = adapter.metadata["ss_network_args"],
              let arguments = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return nil }
        return arguments["algo"] as? String
    }

    static func shapes(_ module: AdapterFile.Module) -> String {
        module.suffixes.map { "\($0) \(module.tensors[$0]!.shape)" }.joined(separator: ", ")
    }

    static func counts(_ adapter: AdapterFile) -> [String: Int] {
        adapter.modules.reduce(into: [:]) { $0[algorithmName($1, in: adapter), default: 0] += 1 }
    }

    /// The width the table keeps to unless `--wide`.
    static let tableWidth = 100
    /// The widest module-name column (longer names are shortened in the middle).
    static let nameColumnLimit = 44

    /// `text` at most `width` characters: the middle replaced by "…" when longer.
    static func shortened(_ text: String, to width: Int) -> String {
        guard text.count > width, width >= 3 else { return text }
        let tail = (width - 1) / 2
        return String(text.prefix(width - 1 - tail)) + "…" + String(text.suffix(tail))
    }

    /// The table: one row per module (name, algo, rank, alpha, dtype, params, tensors), then
    /// totals and the metadata. Unless `wide`, every line fits ``tableWidth`` columns: names
    /// longer than ``nameColumnLimit`` and long metadata values are shortened in the middle,
    /// and tensors that do not fit a row continue on indented lines.
    static func table(_ adapter: AdapterFile, wide: Bool = false) -> String {
        let limit = wide ? Int.max : tableWidth
        func fit(_ text: String) -> String { shortened(text, to: limit) }
        var lines: [String] = []
        let total = adapter.modules.reduce(0) { $0 + $1.parameterCount }
        lines.append(fit("\(adapter.path): \(adapter.modules.count) modules, \(total) parameters"))
        let longest = max(6, adapter.modules.map(\.name.count).max() ?? 0)
        let nameWidth = wide ? longest : min(longest, nameColumnLimit)
        func pad(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.count)) }
        lines.append([pad("module", nameWidth), pad("algo", 10), pad("rank", 5), pad("alpha", 9), pad("dtype", 9), pad("params", 9), "tensors"].joined(separator: " "))
        for module in adapter.modules {
            let row = [
                pad(shortened(module.name, to: nameWidth), nameWidth), pad(algorithmName(module, in: adapter), 10),
                pad(module.rank.map(String.init) ?? "-", 5), pad(module.alpha.map { "\($0)" } ?? "-", 9),
                pad(module.dtypes.map(\.rawValue).joined(separator: ","), 9), pad(String(module.parameterCount), 9),
            ].joined(separator: " ")
            lines += wrapped(row, module.suffixes.map { "\($0) \(module.tensors[$0]!.shape)" }, width: limit)
        }
        lines.append(fit("algorithms: " + counts(adapter).sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        if !adapter.strayKeys.isEmpty { lines.append(fit("keys outside any module: \(adapter.strayKeys.joined(separator: ", "))")) }
        if adapter.metadata.isEmpty {
            lines.append("metadata: none")
        } else {
            lines.append("metadata:")
            for (key, value) in adapter.metadata.sorted(by: { $0.key < $1.key }) { lines.append(fit("  \(key): \(value)")) }
        }
        return lines.joined(separator: "\n")
    }

    /// `row` followed by `items` joined by ", " when that fits `width`; else the row, then
    /// the items on lines indented by 4, as many per line as fit (an item wider than a line
    /// is shortened).
    static func wrapped(_ row: String, _ items: [String], width: Int) -> [String] {
        let joined = items.joined(separator: ", ")
        if row.count + 1 + joined.count <= width { return [row + " " + joined] }
        let indent = "   "
        var lines = [String(row.reversed().drop { $0 == " " }.reversed())]
        var line = indent
        for (index, item) in items.enumerated() {
            let piece = shortened(item + (index < items.count - 1 ? "," : ""), to: width - indent.count - 1)
            if line != indent && line.count + 1 + piece.count > width {
                lines.append(line)
                line = indent
            }
            line += " " + piece
        }
        lines.append(line)
        return lines
    }

    static func jsonObject(_ adapter: AdapterFile) -> [String: Any] {
        let modules: [[String: Any]] = adapter.modules.map { module in
            var entry: [String: Any] = [
                "name": module.name, "algorithm": algorithmName(module, in: adapter),
                "dtypes": module.dtypes.map(\.rawValue), "parameters": module.parameterCount,
                "tensors": Dictionary(uniqueKeysWithValues: module.tensors.map { ($0.key, ["dtype": $0.value.dtype.rawValue, "shape": $0.value.shape] as [String: Any]) }),
            ]
            entry["rank"] = module.rank ?? NSNull()
            entry["alpha"] = module.alpha.map { Double($0) } ?? NSNull()
            entry["dora_axis"] = module.doraAxis ?? NSNull()
            return entry
        }
        return [
            "path": adapter.path, "metadata": adapter.metadata, "modules": modules, "stray_keys": adapter.strayKeys,
            "totals": ["modules": adapter.modules.count, "parameters": adapter.modules.reduce(0) { $0 + $1.parameterCount },
                       "algorithms": counts(adapter)] as [String: Any],
        ]
    }
}
