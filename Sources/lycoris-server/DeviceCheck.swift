import LycorisCUDA
import LycorisDevice

/// `lycoris-server --device-check DEVICE [--cuda-library-dir DIR]…` (hidden): instead of
/// serving, runs ``DeviceSelfCheck`` — the device backend's m·ΔW and ∂parameters against the
/// host engine for every ported algorithm — on `emulated` or `cuda:N` (CUDA loaded from the
/// given folders, then the system's), prints a line per case on stdout and exits 0 when
/// every case is within tolerance, 1 otherwise (or when the device cannot start).
/// `--device-bench DEVICE` prints ``DeviceTiming``'s per-layer times instead.
/// scripts/gpu-check.sh runs both on `cuda:0` with torch's library folders.
enum DeviceCheck {
    static func run(_ device: String, libraryDirectories: [String], timing: Bool) -> Int32 {
        let runtime: DeviceRuntime
        do {
            if device == "emulated" {
                runtime = EmulatedDevice()
            } else {
                guard case let .cuda(index) = try ComputeDevice(parsing: device) else {
                    throw DeviceError("--device-check takes emulated or cuda:N, not \(device)")
                }
                runtime = try CUDADevice(environment: CUDAEnvironment(directories: libraryDirectories), device: index)
            }
        } catch {
            print("device check: \(device) cannot start: \(error)")
            return 1
        }
        let passed = timing ? DeviceTiming.report(on: runtime) { print($0) } : DeviceSelfCheck.report(on: runtime) { print($0) }
        return passed ? 0 : 1
    }
}
