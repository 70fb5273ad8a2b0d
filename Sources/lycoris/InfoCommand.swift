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

    func run() throws {
        let adapter = try AdapterFile(path: file)
        if json {
            let data = try JSONSerialization.data(withJSONObject: Self.jsonObject(adapter), options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(Self.table(adapter))
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

    static func table(_ adapter: AdapterFile) -> String {
        var lines: [String] = []
        let total = adapter.modules.reduce(0) { $0 + $1.parameterCount }
        lines.append("\(adapter.path): \(adapter.modules.count) modules, \(total) parameters")
        let nameWidth = max(6, adapter.modules.map(\.name.count).max() ?? 0)
        func pad(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.count)) }
        lines.append([pad("module", nameWidth), pad("algo", 10), pad("rank", 5), pad("alpha", 9), pad("dtype", 9), pad("params", 9), "tensors"].joined(separator: " "))
        for module in adapter.modules {
            lines.append([
                pad(module.name, nameWidth), pad(algorithmName(module, in: adapter), 10),
                pad(module.rank.map(String.init) ?? "-", 5), pad(module.alpha.map { "\($0)" } ?? "-", 9),
                pad(module.dtypes.map(\.rawValue).joined(separator: ","), 9), pad(String(module.parameterCount), 9),
                shapes(module),
            ].joined(separator: " "))
        }
        lines.append("algorithms: " + counts(adapter).sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        if !adapter.strayKeys.isEmpty { lines.append("keys outside any module: \(adapter.strayKeys.joined(separator: ", "))") }
        if adapter.metadata.isEmpty {
            lines.append("metadata: none")
        } else {
            lines.append("metadata:")
            for (key, value) in adapter.metadata.sorted(by: { $0.key < $1.key }) { lines.append("  \(key): \(value)") }
        }
        return lines.joined(separator: "\n")
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
