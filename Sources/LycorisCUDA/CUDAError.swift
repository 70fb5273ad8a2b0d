/// Why a CUDA library could not be used: each case names what was looked for and where, or
/// the call that failed with the library's own error text.
public enum CUDAError: Error, Equatable, CustomStringConvertible {
    /// No file of `names` could be loaded from `directories` (in order) nor by the system's
    /// search (`dlopen` of the bare name: `LD_LIBRARY_PATH`, the ld.so cache, /lib, /usr/lib).
    /// `failures` are `dlopen`'s messages for files that exist but did not load.
    case libraryNotFound(library: String, names: [String], directories: [String], failures: [String])
    /// The library loaded but lacks a function this backend calls.
    case symbolMissing(symbol: String, path: String)
    /// A call returned an error status.
    case callFailed(function: String, status: Int32, message: String)
    /// NVRTC rejected a kernel source; `log` is its compiler log.
    case compilationFailed(program: String, log: String)
    /// A value from the client that cannot name device memory (an IPC handle of the wrong
    /// length, a range outside its allocation); the message says which.
    case invalidArgument(String)
    /// A device computation gave a result other than the one known in advance (a self-check).
    case wrongResult(String)

    public var description: String {
        switch self {
        case let .libraryNotFound(library, names, directories, failures):
            let places = (directories.isEmpty ? "" : directories.joined(separator: ", ") + " and ")
                + "the system's library search path"
            let detail = failures.isEmpty ? "" : " (" + failures.joined(separator: "; ") + ")"
            return "\(library) not found: looked for \(names.joined(separator: ", ")) in \(places)\(detail)"
        case let .symbolMissing(symbol, path):
            return "\(path) has no function \(symbol)"
        case let .callFailed(function, status, message):
            return "\(function) failed with status \(status): \(message)"
        case let .compilationFailed(program, log):
            return "NVRTC could not compile \(program): \(log)"
        case let .invalidArgument(message), let .wrongResult(message):
            return message
        }
    }
}
