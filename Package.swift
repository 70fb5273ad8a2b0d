// swift-tools-version: 6.0
import PackageDescription

// MARK: - System libraries

/// OpenBLAS: cblas (`cblas_sgemm`) and LAPACK's Fortran symbols (`sgesdd_`), one library.
let openBLAS = Target.systemLibrary(
    name: "COpenBLAS",
    pkgConfig: "openblas",
    providers: [.apt(["libopenblas-dev"])]
)

/// jansson: the JSON codec behind the server's protocol layer.
let jansson = Target.systemLibrary(
    name: "CJansson",
    providers: [.apt(["libjansson-dev"])]
)

/// glibc's `mallopt`, for the server's allocator settings.
let malloc = Target.systemLibrary(name: "CMalloc")

// MARK: - Libraries

let strictSwift: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "swift-lycoris",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "LycorisCore", targets: ["LycorisCore"]),
        .library(name: "LycorisFormats", targets: ["LycorisFormats"]),
        .library(name: "LycorisAlgorithms", targets: ["LycorisAlgorithms"]),
        .library(name: "LycorisCheckpoints", targets: ["LycorisCheckpoints"]),
        .executable(name: "lycoris", targets: ["lycoris"]),
        .executable(name: "lycoris-server", targets: ["lycoris-server"]),
        .library(name: "LycorisRPC", targets: ["LycorisRPC"]),
        .library(name: "LycorisServer", targets: ["LycorisServer"]),
        .library(name: "LycorisDevice", targets: ["LycorisDevice"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        openBLAS,
        jansson,
        malloc,
        // Vectorised direct-convolution kernels (AVX-512 / AVX2 / SSE, chosen at run time);
        // optimised in debug builds too (unoptimised, the register-blocked loops are ~30× slower).
        .target(name: "CLycorisConvKernels", cSettings: [.unsafeFlags(["-O2"])]),
        .target(
            name: "LycorisCore",
            dependencies: ["COpenBLAS", "CLycorisConvKernels"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "LycorisFormats",
            dependencies: ["LycorisCore"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "LycorisAlgorithms",
            dependencies: ["LycorisCore", "LycorisFormats"],
            swiftSettings: strictSwift
        ),
        // CUDA through dlopen (no link-time dependency): driver, cuBLAS, NVRTC.
        .target(
            name: "LycorisCUDA",
            dependencies: ["LycorisCore", "CCUDAIPC"],
            exclude: ["Kernels"],
            swiftSettings: strictSwift
        ),
        // LycorisCUDA's kernel sources compiled as C with a CUDA emulation header, so tests
        // check their index arithmetic on the CPU and LycorisDevice's emulated device runs
        // them (not a product).
        .target(
            name: "CLycorisKernelsCPU",
            cSettings: [.headerSearchPath(".")]
        ),
        // The device backend: adapters' ΔW and its backward in device memory (CUDA, or the
        // emulated device for tests), from the algorithms' generic weight-path math.
        .target(
            name: "LycorisDevice",
            dependencies: ["LycorisCore", "LycorisAlgorithms", "LycorisCUDA", "CLycorisKernelsCPU", "COpenBLAS"],
            swiftSettings: strictSwift
        ),
        // The by-value call of cuIpcOpenMemHandle (its 64-byte handle struct), for LycorisCUDA.
        .target(name: "CCUDAIPC"),
        // Stable Diffusion checkpoints (single files, diffusers folders) and their kohya names.
        .target(
            name: "LycorisCheckpoints",
            dependencies: ["LycorisCore", "LycorisFormats", "LycorisAlgorithms"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "LycorisRPC",
            dependencies: ["CJansson"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "LycorisServer",
            dependencies: [
                "LycorisCore", "LycorisFormats", "LycorisAlgorithms", "LycorisRPC", "LycorisCUDA", "LycorisDevice",
                "LycorisCheckpoints",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "lycoris-server",
            dependencies: [
                "LycorisServer", "LycorisRPC", "LycorisCore", "LycorisFormats", "CMalloc", "LycorisDevice", "LycorisCUDA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "lycoris",
            dependencies: [
                "LycorisCore", "LycorisFormats", "LycorisAlgorithms", "LycorisCheckpoints",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSwift
        ),
        // bench/layers.py's in-process engine timings (goal (a)); not a product, built by bench/run.sh.
        .executableTarget(
            name: "layer-bench",
            dependencies: ["LycorisAlgorithms", "LycorisCore", "CMalloc"],
            path: "bench/LayerBench",
            swiftSettings: strictSwift
        ),
        // Tensor comparisons shared by the test targets (not a product).
        .target(
            name: "LycorisTestSupport",
            dependencies: ["LycorisCore"],
            path: "Tests/LycorisTestSupport",
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCoreTests",
            dependencies: ["LycorisCore", "LycorisTestSupport"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisFormatsTests",
            dependencies: ["LycorisFormats", "LycorisCore", "LycorisTestSupport"],
            resources: [.copy("Fixtures")],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisAlgorithmsTests",
            dependencies: ["LycorisAlgorithms", "LycorisCheckpoints", "LycorisFormats", "LycorisCore", "LycorisTestSupport"],
            resources: [.copy("Fixtures")],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisServerTests",
            dependencies: ["LycorisServer", "LycorisRPC", "LycorisAlgorithms", "LycorisCheckpoints", "LycorisCore", "LycorisTestSupport", "lycoris-server"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCUDATests",
            dependencies: ["LycorisCUDA", "CLycorisKernelsCPU", "LycorisCore", "LycorisTestSupport"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisDeviceTests",
            dependencies: ["LycorisDevice", "LycorisAlgorithms", "LycorisCUDA", "LycorisCore", "LycorisTestSupport"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCheckpointsTests",
            dependencies: ["LycorisCheckpoints", "LycorisAlgorithms", "LycorisFormats", "LycorisCore", "LycorisTestSupport"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCLITests",
            dependencies: ["lycoris"],
            swiftSettings: strictSwift
        ),
    ]
)
