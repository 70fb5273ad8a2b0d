#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A shared library opened at run time with `dlopen`, so the package has no link-time CUDA
/// dependency: the CUDA libraries are looked up in the directories a client names (torch's
/// `site-packages/nvidia/*/lib` wheel folders) and then by the system's search.
///
/// The handle stays open for the life of the process (CUDA libraries are not meant to be
/// unloaded while their state lives), which is why this type has no `deinit`.
public final class DynamicLibrary: @unchecked Sendable {
    /// The file that was loaded (`directory/name`, or the bare name the system resolved).
    public let path: String
    private let handle: UnsafeMutableRawPointer

    private init(path: String, handle: UnsafeMutableRawPointer) {
        self.path = path
        self.handle = handle
    }

    /// The first of `names` that loads from `directories`, in order (every name in the first
    /// directory, then the next), then from the system's search (each bare name).
    /// `library` is the human name used in the error ("libnvrtc (NVRTC)").
    public static func load(_ library: String, names: [String], directories: [String]) throws(CUDAError) -> DynamicLibrary {
        var failures: [String] = []
        let candidates = directories.flatMap { directory in names.map { directory + "/" + $0 } } + names
        for candidate in candidates {
            let isPath = candidate.contains("/")
            if isPath && access(candidate, F_OK) != 0 { continue }
            if let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                return DynamicLibrary(path: candidate, handle: handle)
            }
            // A bare name the system does not know is the ordinary "not here"; a file that
            // exists but does not load (wrong architecture, a missing dependency) is news.
            if isPath, let message = dlerror() { failures.append(String(cString: message)) }
        }
        throw .libraryNotFound(library: library, names: names, directories: directories, failures: failures)
    }

    /// Loads the file at `path`, if there is one, for a library that later opens it itself by
    /// its bare name: the loader then finds it already loaded (by its soname) instead of
    /// searching. Returns whether it loaded; the handle stays open.
    @discardableResult
    public static func preload(_ path: String) -> Bool {
        access(path, F_OK) == 0 && dlopen(path, RTLD_NOW | RTLD_LOCAL) != nil
    }

    /// The C function `symbol`, typed as `T` (a `@convention(c)` function type).
    public func function<T>(_ symbol: String, as type: T.Type) throws(CUDAError) -> T {
        guard let address = dlsym(handle, symbol) else { throw .symbolMissing(symbol: symbol, path: path) }
        return unsafeBitCast(address, to: type)
    }
}

/// The text of a NUL-terminated C string held in an array (up to its first NUL).
func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
