// swift-tools-version: 6.0
import PackageDescription

// A tiny benchmark of the server's JSON codec (LycorisRPC's jansson-based JanssonCodec)
// against Foundation's JSONSerialization. It depends on the main package by path; the
// dependency is named explicitly so that the checkout directory's name does not matter.
//
// Build (from this directory):  swift build -c release --scratch-path .build-bench-codec
let package = Package(
    name: "lycoris-codec-bench",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(name: "swift-lycoris", path: "../.."),
    ],
    targets: [
        .executableTarget(
            name: "codec-bench",
            dependencies: [.product(name: "LycorisRPC", package: "swift-lycoris")],
            swiftSettings: [.swiftLanguageMode(.v5)]
        ),
    ]
)
