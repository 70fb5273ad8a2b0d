import FuzzSupport
import LycorisRPC
import LycorisServer

/// `network.create` and `network.load` with arbitrary params, on an initialised server.
///
/// An input is a JSON object `{"create": params, "load": params}` (either optional; any JSON
/// value is passed as is, so non-object params are tried too). `create` goes to a fresh server
/// state; `load` follows whether or not `create` succeeded. Inputs that name sizes between
/// ``SizeBudget/smallInteger`` and 2²⁰ are skipped (see ``SizeBudget``). Every call must
/// answer or throw an `RPCError`; after them, `network.info` must still answer.
nonisolated(unsafe) private let service = LycorisService()
nonisolated(unsafe) private var initialized = false

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNetworkParams(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let input = try? JanssonCodec.decode(UnsafeRawBufferPointer(start: data, count: size)),
          SizeBudget.admits(input) else { return 0 }
    if !initialized {
        _ = try? service.handle(method: "initialize", params: .object(JSONObject()))
        initialized = true
    }
    var created = false
    for (method, key) in [("network.create", "create"), ("network.load", "load")] {
        guard let params = input[key] else { continue }
        do {
            _ = try service.handle(method: method, params: params)
            if method == "network.create" { created = true }
        } catch is RPCError {
            continue
        } catch {
            preconditionFailure("\(method) threw something other than an RPCError: \(error)")
        }
    }
    if created {
        do {
            _ = try service.handle(method: "network.info", params: nil)
        } catch {
            preconditionFailure("network.info failed after a successful network.create: \(error)")
        }
    }
    // Nothing outlives the input, so LeakSanitizer's per-input check sees every allocation.
    service.releaseAll()
    return 0
}
