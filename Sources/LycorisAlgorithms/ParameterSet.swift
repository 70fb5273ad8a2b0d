import LycorisCore

/// Named tensors in a fixed order: an adapter's trainable parameters, or their gradients.
public struct ParameterSet: Sendable, Equatable {
    public private(set) var names: [String] = []
    private var values: [String: Tensor] = [:]

    public init() {}

    public init(_ entries: [(String, Tensor)]) {
        for (name, tensor) in entries { self[name] = tensor }
    }

    public subscript(name: String) -> Tensor? {
        get { values[name] }
        set {
            if newValue != nil, values[name] == nil { names.append(name) }
            if newValue == nil { names.removeAll { $0 == name } }
            values[name] = newValue
        }
    }

    /// The tensor for `name`; the name must exist.
    public func required(_ name: String) -> Tensor {
        guard let tensor = values[name] else { preconditionFailure("no parameter \(name)") }
        return tensor
    }

    public var entries: [(name: String, tensor: Tensor)] { names.map { ($0, values[$0]!) } }
    public var count: Int { names.count }
    public var scalarCount: Int { values.values.reduce(0) { $0 + $1.count } }
}
