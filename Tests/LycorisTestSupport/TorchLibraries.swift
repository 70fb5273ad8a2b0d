import Foundation

/// The CUDA library folders of the test environment's torch wheels: `$LYCORIS_CUDA_LIBRARY_DIRS`
/// (colon-separated) or else the repository's `.venv/lib/python3*/site-packages/nvidia/*/lib`
/// (made by `make venv`: torch's Linux wheels bring `nvidia-cuda-nvrtc` and `nvidia-cublas`).
public enum TorchLibraries {
    public static let directories: [String] = {
        if let explicit = ProcessInfo.processInfo.environment["LYCORIS_CUDA_LIBRARY_DIRS"], !explicit.isEmpty {
            return explicit.split(separator: ":").map(String.init)
        }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".venv/lib").path
        let files = FileManager.default
        let pythons = ((try? files.contentsOfDirectory(atPath: root)) ?? []).filter { $0.hasPrefix("python3") }.sorted()
        return pythons.flatMap { python -> [String] in
            let nvidia = "\(root)/\(python)/site-packages/nvidia"
            let packages = ((try? files.contentsOfDirectory(atPath: nvidia)) ?? []).sorted()
            return packages.map { "\(nvidia)/\($0)/lib" }.filter { files.fileExists(atPath: $0) }
        }
    }()

    /// Why the wheel folders are missing, for a test that needs them to fail with.
    public static let missing = "no torch CUDA wheel folders: run `make venv` (torch's Linux wheels bring NVRTC and cuBLAS) "
        + "or set LYCORIS_CUDA_LIBRARY_DIRS"
}
