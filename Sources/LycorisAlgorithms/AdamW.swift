import LycorisCore

/// AdamW (decoupled weight decay, torch.optim.AdamW semantics) over named parameters:
///
///     m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
///     θ ← θ − lr·λ·θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
public struct AdamW: Sendable {
    public var learningRate: Float
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var epsilon: Float = 1e-8
    public var weightDecay: Float = 0.01
    public private(set) var step = 0
    private var firstMoment: [String: Tensor] = [:]
    private var secondMoment: [String: Tensor] = [:]

    public init(learningRate: Float, weightDecay: Float = 0.01) {
        self.learningRate = learningRate
        self.weightDecay = weightDecay
    }

    /// Starts optimizer step t+1; call once per step, before the ``update(_:gradients:scope:)``
    /// calls of every module.
    public mutating func beginStep() { step += 1 }

    /// Updates `parameters` of the module `scope` (moments are kept per `scope.name`) given
    /// their gradients, for the current step.
    public mutating func update(_ parameters: inout ParameterSet, gradients: ParameterSet, scope: String) {
        precondition(step > 0, "call beginStep() before update")
        let correction1 = 1 - power(beta1, step)
        let correction2 = 1 - power(beta2, step)
        for (name, value) in parameters.entries {
            guard let grad = gradients[name] else { continue }
            let key = scope + "." + name
            var m = firstMoment[key] ?? .zeros(value.shape)
            var v = secondMoment[key] ?? .zeros(value.shape)
            var theta = value
            for i in theta.scalars.indices {
                let g = grad.scalars[i]
                m.scalars[i] = beta1 * m.scalars[i] + (1 - beta1) * g
                v.scalars[i] = beta2 * v.scalars[i] + (1 - beta2) * g * g
                let update = (m.scalars[i] / correction1) / ((v.scalars[i] / correction2).squareRoot() + epsilon)
                theta.scalars[i] -= learningRate * (weightDecay * theta.scalars[i] + update)
            }
            firstMoment[key] = m
            secondMoment[key] = v
            parameters[name] = theta
        }
    }

    /// baseᵗ in Double (t is an integer step count).
    private func power(_ base: Float, _ exponent: Int) -> Float {
        var result = 1.0
        for _ in 0..<exponent { result *= Double(base) }
        return Float(result)
    }
}
