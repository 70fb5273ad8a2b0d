// codec-bench: jansson (LycorisRPC.JanssonCodec + JSONValue) vs Foundation JSONSerialization.
//
// Prints one JSON object per line: {"case": …, "codec": …, "ns_per_op": median, "p90_ns": …,
// "bytes": …, "iterations": …}. Every case is run in `rounds` timed rounds after a warm-up;
// the median and p90 are over rounds (each round's time divided by its iterations).
//
// Cases:
//   request_decode  (a) a ~200-byte `forward` request: parse + read method, id, the first
//                   call's module, input offset and shape (what the dispatcher and Params do).
//   floats_encode   (b) a response holding 262,144 floats as a JSON array: tree → bytes
//                   (the tree is prebuilt; building it is the separate `floats_build` case).
//   floats_build        [Float] → the codec's tree (JSONValue / [String: Any]).
//   floats_decode       the same response text → tree, then the floats read back as [Float].
import Foundation
import LycorisRPC

var rounds = 15
var scale = 1.0
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--rounds": rounds = Int(arguments.next() ?? "") ?? rounds
    case "--scale": scale = Double(arguments.next() ?? "") ?? scale
    default:
        FileHandle.standardError.write("usage: codec-bench [--rounds N] [--scale F]\n".data(using: .utf8)!)
        exit(2)
    }
}

@inline(never) func blackHole<T>(_ value: T) { withExtendedLifetime(value) {} }

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

func report(_ name: String, _ codec: String, bytes: Int, iterations: Int, _ body: () -> Void) {
    let iterations = max(1, Int(Double(iterations) * scale))
    for _ in 0..<max(1, iterations / 4) { body() }  // warm-up
    var perOp: [Double] = []
    for _ in 0..<rounds {
        let start = now()
        for _ in 0..<iterations { body() }
        perOp.append(Double(now() - start) / Double(iterations))
    }
    perOp.sort()
    let median = perOp[perOp.count / 2]
    let p90 = perOp[min(perOp.count - 1, Int((Double(perOp.count) * 0.9).rounded(.up)) - 1)]
    print("{\"case\":\"\(name)\",\"codec\":\"\(codec)\",\"ns_per_op\":\(median),\"p90_ns\":\(p90),\"bytes\":\(bytes),\"iterations\":\(iterations),\"rounds\":\(rounds)}")
}

// MARK: (a) a small request

let request = #"{"jsonrpc":"2.0","id":12345,"method":"forward","params":{"calls":[{"module":"lin_lora","input":{"dtype":"F32","shape":[1,4096,320],"offset":0},"output":{"offset":5242880}}],"grad":true}}"#
let requestBytes = Array(request.utf8)
let requestData = Data(requestBytes)

report("request_decode", "jansson", bytes: requestBytes.count, iterations: 20_000) {
    let message = try! JanssonCodec.decode(requestBytes)
    guard case let .string(method)? = message["method"], case let .integer(id)? = message["id"],
          case let .array(calls)? = message["params"]?["calls"], let call = calls.first,
          case let .string(module)? = call["module"], let offset = call["input"]?["offset"]?.intValue,
          case let .array(shape)? = call["input"]?["shape"], case .bool(true)? = message["params"]?["grad"]
    else { fatalError("request_decode: unexpected structure") }
    blackHole((method, id, module, offset, shape.compactMap(\.intValue)))
}

report("request_decode", "foundation", bytes: requestBytes.count, iterations: 20_000) {
    let message = try! JSONSerialization.jsonObject(with: requestData) as! [String: Any]
    guard let method = message["method"] as? String, let id = message["id"] as? Int,
          let params = message["params"] as? [String: Any], let calls = params["calls"] as? [[String: Any]],
          let call = calls.first, let module = call["module"] as? String,
          let input = call["input"] as? [String: Any], let offset = input["offset"] as? Int,
          let shape = input["shape"] as? [Int], (params["grad"] as? Bool) == true
    else { fatalError("request_decode: unexpected structure") }
    blackHole((method, id, module, offset, shape))
}

// MARK: (b) a response with 262,144 floats

let count = 262_144
var generator = SystemRandomNumberGenerator()
let floats: [Float] = (0..<count).map { _ in Float.random(in: -1..<1, using: &generator) }

func janssonTree(_ values: [Float]) -> JSONValue {
    ["jsonrpc": "2.0", "id": 7, "result": ["dtype": "F32", "shape": [.integer(Int64(values.count))],
                                          "values": .array(values.map { .double(Double($0)) })]]
}
func foundationTree(_ values: [Float]) -> [String: Any] {
    ["jsonrpc": "2.0", "id": 7, "result": ["dtype": "F32", "shape": [values.count],
                                          "values": values.map { Double($0) }] as [String: Any]]
}

let jTree = janssonTree(floats)
let fTree = foundationTree(floats)
let jText = JanssonCodec.encode(jTree)
let fText = try! JSONSerialization.data(withJSONObject: fTree)

report("floats_build", "jansson", bytes: 0, iterations: 4) { blackHole(janssonTree(floats)) }
report("floats_build", "foundation", bytes: 0, iterations: 4) { blackHole(foundationTree(floats)) }
report("floats_encode", "jansson", bytes: jText.count, iterations: 2) { blackHole(JanssonCodec.encode(jTree)) }
report("floats_encode", "foundation", bytes: fText.count, iterations: 2) {
    blackHole(try! JSONSerialization.data(withJSONObject: fTree))
}
report("floats_decode", "jansson", bytes: jText.count, iterations: 2) {
    let message = try! JanssonCodec.decode(jText)
    guard case let .array(values)? = message["result"]?["values"] else { fatalError("floats_decode") }
    let decoded = values.map { Float($0.doubleValue!) }
    precondition(decoded.count == count)
    blackHole(decoded)
}
report("floats_decode", "foundation", bytes: fText.count, iterations: 2) {
    let message = try! JSONSerialization.jsonObject(with: fText) as! [String: Any]
    guard let result = message["result"] as? [String: Any], let values = result["values"] as? [Any] else { fatalError("floats_decode") }
    let decoded = values.map { Float(($0 as! NSNumber).doubleValue) }
    precondition(decoded.count == count)
    blackHole(decoded)
}
