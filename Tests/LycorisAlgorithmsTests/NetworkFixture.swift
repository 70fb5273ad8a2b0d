import Foundation
import LycorisAlgorithms
import LycorisCore
import LycorisFormats
import Testing

/// The tiny diffusers-named model of `Fixtures/networks/` and LyCORIS's files for it.
enum NetworkFixture {
    static func path(_ name: String) -> String {
        fixturesDirectory.appendingPathComponent("networks/\(name).safetensors").path
    }

    static var base: SafetensorsFile { get throws { try SafetensorsFile(path: path("base")) } }

    /// The layer of a base weight key, with `same` padding for k×k convolutions (how the
    /// fixture model builds them).
    static func layer(weightShape shape: [Int]) -> LayerSpec {
        if shape.count == 2 { return .linear(inFeatures: shape[1], outFeatures: shape[0]) }
        let kernel = [shape[2], shape[3]]
        return .convolution(ConvGeometry(inChannels: shape[1], outChannels: shape[0], kernelSize: kernel,
                                         padding: kernel.map { ($0 - 1) / 2 }))
    }

    /// The conv1d/conv3d layers of `convnd_base`, by model path, from its `layers` metadata.
    static func convNdLayers() throws -> [String: LayerSpec] {
        let base = try SafetensorsFile(path: path("convnd_base"))
        let layers = try JSONSerialization.jsonObject(with: Data(base.metadata["layers"]!.utf8)) as! [String: [String: Any]]
        return layers.mapValues { g in
            .convolution(ConvGeometry(inChannels: g["in_channels"] as! Int, outChannels: g["out_channels"] as! Int,
                                      kernelSize: g["kernel_size"] as! [Int], stride: g["stride"] as? [Int],
                                      padding: g["padding"] as? [Int], dilation: g["dilation"] as? [Int], groups: g["groups"] as! Int))
        }
    }

    /// Every layer of the base model by module path, from base.safetensors' `layers` metadata
    /// (linear, conv2d, and the LayerNorm as a norm layer with its eps).
    static func layers() throws -> [String: LayerSpec] {
        let text = try #require(try base.metadata["layers"])
        let described = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: [String: Any]])
        return described.mapValues { layer in
            switch layer["kind"] as? String {
            case "linear": .linear(inFeatures: layer["in_features"] as! Int, outFeatures: layer["out_features"] as! Int)
            case "layernorm": .norm(Normalization(kind: .layer(normalizedShape: layer["normalized_shape"] as! [Int]), eps: layer["eps"] as! Double))
            default: .convolution(ConvGeometry(inChannels: layer["in_channels"] as! Int, outChannels: layer["out_channels"] as! Int,
                                            kernelSize: layer["kernel_size"] as! [Int], stride: layer["stride"] as? [Int],
                                            padding: layer["padding"] as? [Int], dilation: layer["dilation"] as? [Int],
                                            groups: layer["groups"] as! Int))
            }
        }
    }

    /// (base weight key, input, LyCORIS's adapted output) for every layer in
    /// `<algo>.expected` (which names layers by module path: `x.<path>`, `y.<path>`).
    static func expectedLayers(_ algo: String) throws -> [(key: String, x: Tensor, y: Tensor)] {
        let file = try SafetensorsFile(path: path("\(algo).expected"))
        return try file.tensorNames.filter { $0.hasPrefix("x.") }.map { name in
            let path = String(name.dropFirst(2))
            return (path + ".weight", try file.tensor(name), try file.tensor("y.\(path)"))
        }
    }
}
