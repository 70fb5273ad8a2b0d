import LycorisRPC

/// Keeps fuzz inputs that describe layers from asking for legitimately huge tensors.
///
/// The server accepts layers up to 2³² weight elements (16 GiB of F32), which is a valid
/// request, not a bug, but one such input would stop the fuzzer at its memory limit. So an
/// input is run only when every integer in it is at most ``smallInteger`` or above
/// ``LycorisService``'s per-extent limit 2²⁰ (rejected by the server before it allocates),
/// which keeps every accepted tensor under a few MiB while leaving every check reachable.
public enum SizeBudget {
    /// The largest integer kept as a size (a conv3d of 16 channels and kernel 16³ has 2²⁰
    /// weight elements).
    public static let smallInteger: Int64 = 16
    /// Integers above this are over the server's per-extent limit.
    public static let overLimit: Int64 = 1 << 20

    /// Whether every integer in `value` (at any depth) is small or over the limit.
    public static func admits(_ value: JSONValue) -> Bool {
        switch value {
        case let .integer(i): return i <= smallInteger || i > overLimit
        case let .double(d): return !(d > Double(smallInteger) && d <= Double(overLimit))
        case let .array(items): return items.allSatisfy(admits)
        case let .object(object): return object.members.allSatisfy { admits($0.value) }
        case .null, .bool, .string: return true
        }
    }
}
