/// The parameter initialisations LyCORIS uses (torch.nn.init semantics).
extension Tensor {
    /// torch's fan-in of a weight: `shape[1] · Π shape[2...]` (for a vector, its length).
    public static func fanIn(of shape: [Int]) -> Int {
        precondition(!shape.isEmpty, "fan-in of a scalar")
        if shape.count == 1 { return shape[0] }
        return shape[1] * shape[2...].reduce(1, *)
    }

    /// kaiming_uniform_(a): U(−b, b) with b = gain·√(3/fan_in), gain = √(2/(1+a²)).
    /// With LyCORIS's a = √5 this is b = 1/√fan_in.
    public static func kaimingUniform(_ shape: [Int], a: Float = Float(5).squareRoot(), using random: inout RandomSource) -> Tensor {
        let fanIn = Float(Swift.max(1, fanIn(of: shape)))
        let gain = (2 / (1 + a * a)).squareRoot()
        let bound = gain * (3 / fanIn).squareRoot()
        return Tensor(shape: shape, scalars: (0..<shape.product).map { _ in random.uniform(-bound, bound) })
    }

    /// normal_(0, std).
    public static func normal(_ shape: [Int], std: Float, using random: inout RandomSource) -> Tensor {
        Tensor(shape: shape, scalars: (0..<shape.product).map { _ in random.normal() * std })
    }
}
