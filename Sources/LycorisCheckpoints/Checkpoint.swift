import Foundation
import LycorisFormats

/// A model's weights as users have them, opened memory-mapped:
/// - a **single file** (`.safetensors`): an LDM checkpoint (`model.diffusion_model.…`,
///   `cond_stage_model.…`, `conditioner.embedders.…`) or any plain state dict;
/// - a **diffusers folder**: `unet/`, `text_encoder/`, `text_encoder_2/`, each holding
///   `diffusion_pytorch_model.safetensors` / `model.safetensors`, or shards listed by a
///   `*.safetensors.index.json` (`weight_map`), or exactly one other `.safetensors` file.
///   Other files and folders (VAE, tokenizer, configs) are not read.
public final class Checkpoint: Sendable {
    public enum Layout: String, Sendable {
        case singleFile = "single-file"
        case diffusersFolder = "diffusers"
    }

    /// One safetensors file of the checkpoint.
    public struct Part: Sendable {
        /// Relative to ``Checkpoint/path`` for a folder (`unet/diffusion_pytorch_model.safetensors`);
        /// the file name for a single file.
        public let relativePath: String
        /// The component every key of the file belongs to (diffusers folders only).
        public let component: CheckpointComponent?
        public let file: SafetensorsFile
    }

    public let path: String
    public let layout: Layout
    public let parts: [Part]

    public init(path: String) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw CheckpointError("\(path): no such file or folder")
        }
        self.path = path
        if !isDirectory.boolValue {
            layout = .singleFile
            parts = [Part(relativePath: (path as NSString).lastPathComponent, component: nil, file: try SafetensorsFile(path: path))]
            return
        }
        layout = .diffusersFolder
        var parts: [Part] = []
        for component in CheckpointComponent.allCases {
            let folder = (path as NSString).appendingPathComponent(component.folder)
            guard FileManager.default.fileExists(atPath: folder) else { continue }
            for name in try Self.weightFiles(in: folder) {
                let file = try SafetensorsFile(path: (folder as NSString).appendingPathComponent(name))
                parts.append(Part(relativePath: component.folder + "/" + name, component: component, file: file))
            }
        }
        guard parts.contains(where: { $0.component == .unet || $0.component == .textEncoder }) else {
            throw CheckpointError("\(path): a folder but not a diffusers pipeline (no unet/ or text_encoder/ with .safetensors weights)")
        }
        self.parts = parts
    }

    /// The safetensors files of one component folder, in shard order.
    static func weightFiles(in folder: String) throws -> [String] {
        let names = try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
        if let index = names.first(where: { $0.hasSuffix(".safetensors.index.json") }) {
            let data = try Data(contentsOf: URL(fileURLWithPath: (folder as NSString).appendingPathComponent(index)))
            guard let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let map = json["weight_map"] as? [String: String] else {
                throw CheckpointError("\(folder)/\(index): no \"weight_map\" object")
            }
            let shards = Set(map.values).sorted()
            for shard in shards where !names.contains(shard) {
                throw CheckpointError("\(folder)/\(index) lists \(shard), which is missing")
            }
            return shards
        }
        let safetensors = names.filter { $0.hasSuffix(".safetensors") }
        for preferred in ["diffusion_pytorch_model.safetensors", "model.safetensors"] where safetensors.contains(preferred) {
            return [preferred]
        }
        guard safetensors.count <= 1 else {
            throw CheckpointError("\(folder): several .safetensors files (\(safetensors.joined(separator: ", "))) and no index to choose")
        }
        return safetensors
    }

    /// Every tensor's shape, keyed as the layout spells it (single file: the full key;
    /// folder: the key inside its component file).
    public var shapes: [String: [Int]] {
        var result: [String: [Int]] = [:]
        for part in parts {
            for info in part.file.tensors { result[info.name] = info.shape }
        }
        return result
    }
}

/// A checkpoint that cannot be read or named.
public struct CheckpointError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
