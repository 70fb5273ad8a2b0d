import Foundation
import Testing

/// Locates the copied `Fixtures` folder of this test target.
enum Fixtures {
    static func directory() throws -> URL {
        try #require(Bundle.module.url(forResource: "Fixtures", withExtension: nil),
                     "the Fixtures resource folder is missing from the test bundle")
    }

    static func url(_ name: String) throws -> URL {
        try directory().appendingPathComponent(name)
    }

    static func path(_ name: String) throws -> String {
        try url(name).path
    }

    /// All fixture file names.
    static func names() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory().path).sorted()
    }
}

/// A fresh, empty temporary directory, removed by `cleanUp()`.
struct TemporaryDirectory {
    let url: URL

    init() throws {
        url = FileManager.default.temporaryDirectory
            .appendingPathComponent("lycoris-formats-tests-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    func file(_ name: String) -> URL { url.appendingPathComponent(name) }

    func contents() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: url.path).sorted()
    }

    func cleanUp() {
        try? FileManager.default.removeItem(at: url)
    }
}
