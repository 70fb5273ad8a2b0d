import LycorisFormats
import LycorisRPC

extension LycorisService {
    /// `file.describe`: what a client needs to know about a safetensors file before it builds
    /// a network for it — every tensor's key, dtype and shape (in file order) and the
    /// `__metadata__` — read through the validating reader, so that a client never parses a
    /// header itself. A file that breaks a rule is -32005 naming the file and the rule
    /// (`data.file`, `data.rule`). Needs no network.
    func fileDescribe(_ p: Params) throws -> JSONValue {
        let path = try p.string("path")
        let file: SafetensorsFile
        do {
            file = try SafetensorsFile(path: path)
        } catch let error as SafetensorsError {
            throw RPCError.io(error.description, path: path, rule: error.rule)
        }
        let tensors: [JSONValue] = file.tensors.map {
            ["key": .string($0.name), "dtype": .string($0.dtype.rawValue), "shape": JSONValue($0.shape)]
        }
        return ["path": .string(path), "bytes": JSONValue(file.fileSize), "tensors": .array(tensors),
                "metadata": .object(JSONObject(file.metadata))]
    }
}
