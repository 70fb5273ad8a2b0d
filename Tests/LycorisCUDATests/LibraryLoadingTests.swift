import Foundation
import LycorisCUDA
import Testing

/// The not-found and broken-library paths of ``DynamicLibrary``: the errors name the library,
/// every file name tried, every directory, and dlopen's reason for a file that would not load.
@Suite struct LibraryLoadingTests {
    static func temporaryDirectory() throws -> String {
        let path = NSTemporaryDirectory() + "lycoris-cuda-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test func aMissingLibraryNamesWhatWasLookedForAndWhere() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let names = ["libnot-cuda.so.99", "libnot-cuda.so"]
        let error = #expect(throws: CUDAError.self) {
            try DynamicLibrary.load("libnot-cuda (a test)", names: names, directories: [directory, "/nonexistent"])
        }
        #expect(error == .libraryNotFound(library: "libnot-cuda (a test)", names: names,
                                          directories: [directory, "/nonexistent"], failures: []))
        #expect(error?.description == "libnot-cuda (a test) not found: looked for libnot-cuda.so.99, libnot-cuda.so in "
            + "\(directory), /nonexistent and the system's library search path")
    }

    @Test func aFileThatIsNotALibraryIsReportedWithDlopensReason() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try Data("not an ELF file".utf8).write(to: URL(fileURLWithPath: directory + "/libnot-cuda.so.99"))
        let error = #expect(throws: CUDAError.self) {
            try DynamicLibrary.load("libnot-cuda", names: ["libnot-cuda.so.99"], directories: [directory])
        }
        guard case let .libraryNotFound(_, _, _, failures)? = error else {
            Issue.record("expected libraryNotFound, got \(String(describing: error))")
            return
        }
        #expect(failures.count == 1)
        #expect(failures.first?.contains(directory + "/libnot-cuda.so.99") == true)
        #expect(error?.description.contains("(\(failures[0]))") == true)
    }

    @Test func theFirstDirectoryThatHasTheLibraryWinsOverTheSystem() throws {
        // libc.so.6 is on every glibc system: a directory holding a copy is searched first.
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let system = try DynamicLibrary.load("libc", names: ["libc.so.6"], directories: ["/nonexistent"])
        #expect(system.path == "libc.so.6")
        try FileManager.default.createSymbolicLink(atPath: directory + "/libm.so.6",
                                                   withDestinationPath: "/lib/x86_64-linux-gnu/libm.so.6")
        let local = try DynamicLibrary.load("libm", names: ["libm.so.6"], directories: [directory])
        #expect(local.path == directory + "/libm.so.6")
    }

    @Test func aMissingFunctionIsNamedWithTheLibrary() throws {
        let libc = try DynamicLibrary.load("libc", names: ["libc.so.6"], directories: [])
        let error = #expect(throws: CUDAError.self) {
            _ = try libc.function("cuNotAFunction", as: (@convention(c) () -> Int32).self)
        }
        #expect(error == .symbolMissing(symbol: "cuNotAFunction", path: "libc.so.6"))
        #expect(error?.description == "libc.so.6 has no function cuNotAFunction")
    }
}
