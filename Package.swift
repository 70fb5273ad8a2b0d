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

// MARK: - Libraries

let strictSwift: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "swift-lycoris",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "LycorisCore", targets: ["LycorisCore"]),
        .library(name: "LycorisFormats", targets: ["LycorisFormats"]),
        .library(name: "LycorisAlgorithms", targets: ["LycorisAlgorithms"]),
        .executable(name: "lycoris", targets: ["lycoris"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        openBLAS,
        jansson,
        .target(
            name: "LycorisCore",
            dependencies: ["COpenBLAS"],
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
        .executableTarget(
            name: "lycoris",
            dependencies: [
                "LycorisCore", "LycorisFormats", "LycorisAlgorithms",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCoreTests",
            dependencies: ["LycorisCore"],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisFormatsTests",
            dependencies: ["LycorisFormats", "LycorisCore"],
            resources: [.copy("Fixtures")],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisAlgorithmsTests",
            dependencies: ["LycorisAlgorithms", "LycorisFormats", "LycorisCore"],
            resources: [.copy("Fixtures")],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "LycorisCLITests",
            dependencies: ["lycoris"],
            swiftSettings: strictSwift
        ),
    ]
)
