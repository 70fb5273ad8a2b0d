// swift-tools-version: 6.0
import PackageDescription

// libFuzzer targets for the parsers of swift-lycoris (see README.md). Built only by
// fuzz/run.sh, with `-sanitize=fuzzer,address` into .build-fuzz; the root package does not
// know about this one, so its normal build is unchanged. libFuzzer supplies `main`, hence
// `-parse-as-library` and a `@_cdecl("LLVMFuzzerTestOneInput")` entry in each target.

let fuzzTarget: [SwiftSetting] = [.swiftLanguageMode(.v6), .unsafeFlags(["-parse-as-library"])]

func lycoris(_ product: String) -> Target.Dependency {
    .product(name: product, package: "swift-lycoris")
}

let package = Package(
    name: "swift-lycoris-fuzz",
    platforms: [.macOS(.v14)],
    dependencies: [.package(name: "swift-lycoris", path: "..")],
    targets: [
        .target(
            name: "FuzzSupport",
            dependencies: [lycoris("LycorisRPC")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "fuzz-safetensors",
            dependencies: ["FuzzSupport", lycoris("LycorisFormats"), lycoris("LycorisCore")],
            swiftSettings: fuzzTarget
        ),
        .executableTarget(
            name: "fuzz-framing",
            dependencies: ["FuzzSupport", lycoris("LycorisRPC")],
            swiftSettings: fuzzTarget
        ),
        .executableTarget(
            name: "fuzz-network-params",
            dependencies: ["FuzzSupport", lycoris("LycorisServer"), lycoris("LycorisRPC")],
            swiftSettings: fuzzTarget
        ),
        .executableTarget(
            name: "fuzz-call-record",
            dependencies: ["FuzzSupport", lycoris("LycorisServer"), lycoris("LycorisRPC")],
            swiftSettings: fuzzTarget
        ),
        .executableTarget(
            name: "fuzz-adapter-file",
            dependencies: ["FuzzSupport", lycoris("LycorisAlgorithms"), lycoris("LycorisServer"), lycoris("LycorisRPC")],
            swiftSettings: fuzzTarget
        ),
    ]
)
