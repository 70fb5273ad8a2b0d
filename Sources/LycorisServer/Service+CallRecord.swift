import LycorisAlgorithms
import LycorisCore
import LycorisRPC

extension LycorisService {
    /// What `initialize` offers of the binary call record (protocol/README.md, "Binary call
    /// record"): its version and the method codes it carries.
    static var callRecordCapability: JSONValue {
        var methods = JSONObject()
        for method in CallRecord.Method.allCases { methods[method.name] = .integer(Int64(method.rawValue)) }
        return ["version": .integer(Int64(CallRecord.version)), "methods": .object(methods)]
    }

    /// Answers one binary call record (`record`: the whole record, its length already
    /// checked by the reader) with a response record; any problem — a truncated or
    /// malformed record, an unknown method code, module handle or tape, a descriptor outside
    /// the arena — gets an error record carrying the JSON-RPC error object, as the JSON path
    /// would answer it. The same checks run before anything is computed. A `tapes.release`
    /// record is never answered (nil), like a JSON-RPC notification; its problems are logged.
    public func handleRecord(_ record: [UInt8]) -> [UInt8]? {
        var reader = CallRecordReader(record)
        var id: UInt64 = 0
        do {
            let version = try reader.u8("magic") == CallRecord.magic ? try reader.u8("version") : 0
            guard version == CallRecord.version else {
                throw RPCError.invalidRequest("call record version \(version); this server reads version \(CallRecord.version)")
            }
            let code = try reader.u16("method")
            try reader.skip(4, "length")
            id = try reader.u64("id")
            guard let method = CallRecord.Method(rawValue: code) else {
                throw RPCError(code: RPCError.methodNotFoundCode, message: "Method not found: call record method code \(code)",
                               data: ["method_code": .integer(Int64(code))])
            }
            if method == .tapesRelease {
                do {
                    guard initialized else { throw RPCError.notInitialized(method.name) }
                    try recordTapesRelease(&reader)
                } catch let error as RPCError {
                    logger.warning("tapes.release record (not answered): \(error.message)")
                } catch {
                    logger.warning("tapes.release record (not answered): \(error)")
                }
                return nil
            }
            guard initialized else { throw RPCError.notInitialized(method.name) }
            do {
                switch method {
                case .forward: return try recordForward(&reader, id: id)
                case .backward: return try recordBackward(&reader, id: id)
                case .tapesRelease: return nil
                }
            } catch let error as AdapterError {
                throw RPCError.adapter(error.description)
            }
        } catch let error as RPCError {
            logger.debug("call record failed: \(error.message)")
            return CallRecordWriter.error(id: id, error)
        } catch {
            return CallRecordWriter.error(id: id, .internalError("\(error)"))
        }
    }

    /// `forward` (code 1): one call; the response body is the tape id (0: none kept).
    private func recordForward(_ reader: inout CallRecordReader, id: UInt64) throws -> [UInt8] {
        let network = try requireNetwork()
        let handle = try reader.u32("module")
        guard Int(handle) < network.modules.count else {
            throw RPCError.unknownModule("handle \(handle) (the network has \(network.modules.count) modules)", kind: "module handle")
        }
        let module = network.modules[Int(handle)]
        let flags = try reader.u32("flags")
        guard flags & ~(CallRecord.forwardGrad | CallRecord.forwardElementwise | CallRecord.forwardFull) == 0 else {
            throw RPCError.invalidParams("forward flags \(flags) set bits other than grad (1), elementwise (2) and full (4)", path: "flags")
        }
        let (x, _) = try RPCError.naming(module: module.name, pass: "forward") { try readTensor(&reader, "input") }
        let destination = try readOutput(&reader, "output")
        try reader.expectEnd()
        let call = try prepareForward(module: module, x: x, full: flags & CallRecord.forwardFull != 0,
                                      elementwise: flags & CallRecord.forwardElementwise != 0, destination: destination) { $0 }
        let keepTape = flags & CallRecord.forwardGrad != 0
        if keepTape { try reserveTapes(1) }
        let (_, tape) = try CallThreads.run(multiplyAdds: call.multiplyAdds) { try runForward(call, keepTape: keepTape, outputPath: "output") }
        var writer = CallRecordWriter(code: CallRecord.Status.ok.rawValue, id: id, capacity: 24)
        writer.u64(UInt64(tape ?? 0))
        return writer.finish()
    }

    /// `backward` (code 2): one call; the response has no body.
    private func recordBackward(_ reader: inout CallRecordReader, id: UInt64) throws -> [UInt8] {
        _ = try requireNetwork()
        let tape = try reader.count("tape")
        let flags = try reader.u32("flags")
        guard flags & ~(CallRecord.backwardKeep | CallRecord.backwardAccumulate | CallRecord.backwardParameterGrads) == 0 else {
            throw RPCError.invalidParams("backward flags \(flags) set bits other than keep (1), accumulate (2) and parameter_grads (4)", path: "flags")
        }
        let gradCount = Int(try reader.u32("parameter_grads"))
        let (record, module) = try backwardTarget(Int64(tape), seen: [], expectDeltaWeight: false)
        let (gradient, _) = try RPCError.naming(module: module.name, pass: "backward") { try readTensor(&reader, "grad_output") }
        try checkBackwardGradient(gradient, record: record, module: module, path: "grad_output")
        let inputDestination = try readOutput(&reader, "grad_input")
        try transport.validate(inputDestination, count: record.input.count, path: "grad_input")
        var outputs: [ParameterOutput]?
        if flags & CallRecord.backwardParameterGrads != 0 {
            let expected = module.algorithm.parameters.entries.count
            guard gradCount == expected else {
                throw RPCError.invalidParams("parameter_grads is \(gradCount); module \(module.name) has \(expected) parameters", path: "parameter_grads")
            }
            outputs = try parameterOutputs(module) { _, index in
                let path = "parameter_grads[\(index)]"
                return (try readOutput(&reader, path), path)
            }
        } else if gradCount != 0 {
            throw RPCError.invalidParams("parameter_grads is \(gradCount) without the parameter_grads flag (4)", path: "parameter_grads")
        }
        try reader.expectEnd()
        let call = PreparedBackward(id: Int64(tape), record: record, module: module, gradient: gradient, biasGradient: nil,
                                    inputDestination: inputDestination, inputPath: "grad_input", layerInputOutput: nil,
                                    parameterOutputs: outputs, keep: flags & CallRecord.backwardKeep != 0)
        _ = try CallThreads.run(multiplyAdds: call.multiplyAdds) {
            try runBackward(call, accumulate: flags & CallRecord.backwardAccumulate != 0)
        }
        return CallRecordWriter(code: CallRecord.Status.ok.rawValue, id: id).finish()
    }

    /// `tapes.release` (code 3): drops the tapes listed (unknown ids are ignored, as in JSON).
    private func recordTapesRelease(_ reader: inout CallRecordReader) throws {
        let count = Int(try reader.u32("count"))
        guard count <= (reader.bytes.count - reader.position) / 8 else {
            throw RPCError.invalidParams("count \(count) needs \(count * 8) bytes of tapes, the record has \(reader.bytes.count - reader.position)", path: "count")
        }
        var tapes: [Int64] = []
        tapes.reserveCapacity(count)
        for index in 0..<count { tapes.append(Int64(bitPattern: try reader.u64("tapes[\(index)]"))) }
        try reader.expectEnd()
        for tape in tapes { pending[tape] = nil }
    }

    /// A tensor descriptor (offset, dtype, rank, extents) read from the arena.
    private func readTensor(_ reader: inout CallRecordReader, _ path: String) throws -> (Tensor, DType) {
        let offset = try reader.count("\(path).offset")
        let dtype = try recordDType(try reader.u8("\(path).dtype"), path: "\(path).dtype")
        let rank = Int(try reader.u8("\(path).rank"))
        guard rank <= CallRecord.maximumRank else {
            throw RPCError.invalidParams("\(path).rank is \(rank), more than \(CallRecord.maximumRank)", path: "\(path).rank")
        }
        try reader.skip(2, "\(path).reserved")
        var shape: [Int] = []
        shape.reserveCapacity(rank)
        for axis in 0..<rank { shape.append(try reader.count("\(path).shape[\(axis)]")) }
        return (try transport.readArena(offset: offset, dtype: dtype, shape: shape, path: path, shapePath: "\(path).shape"), dtype)
    }

    /// An output descriptor (offset, dtype): always the arena.
    private func readOutput(_ reader: inout CallRecordReader, _ path: String) throws -> TensorTransport.Destination {
        let offset = try reader.count("\(path).offset")
        let dtype = try recordDType(try reader.u8("\(path).dtype"), path: "\(path).dtype")
        try reader.skip(3, "\(path).reserved")
        return .arena(offset: offset, dtype: dtype)
    }

    private func recordDType(_ code: UInt8, path: String) throws -> DType {
        guard Int(code) < CallRecord.dtypeNames.count else {
            throw RPCError.dtypeMismatch("\(path) has dtype code \(code); codes are 0 (F32), 1 (F16) and 2 (BF16)", path: path)
        }
        return try TensorTransport.dtype(CallRecord.dtypeNames[Int(code)], path: path)
    }
}
