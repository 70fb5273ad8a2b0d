import LycorisCore

/// AdamW and SGD with momentum over named tensors, with torch.optim semantics:
///
///     AdamW: θ ← θ − lr·λ·θ;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
///            θ ← θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
///     SGD:   g ← g + λ·θ;  b ← μ·b + g (b = g at the first step);  g ← g + μ·b (Nesterov) or b
///            θ ← θ − lr·g
///
/// State (moments, momentum buffers) is kept per parameter key and can be saved and
/// restored; learning rate and weight decay are given per update so groups can differ.
public struct Optimizer: Sendable {
    public enum Kind: String, Sendable, CaseIterable { case adamw, sgd }

    public var kind: Kind
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var epsilon: Float = 1e-8
    public var momentum: Float = 0
    public var nesterov = false
    /// Steps taken (t).
    public var step = 0
    /// Per parameter key: its state tensors by name (`exp_avg`, `exp_avg_sq`, `momentum_buffer`).
    public var state: [String: [String: Tensor]] = [:]

    public init(kind: Kind) { self.kind = kind }

    /// Starts step t+1; call once per step before the updates.
    public mutating func beginStep() { step += 1 }

    /// Updates one parameter for the current step.
    public mutating func update(key: String, value: inout Tensor, gradient: Tensor, learningRate lr: Float, weightDecay: Float) {
        precondition(step > 0, "call beginStep() before update")
        precondition(value.shape == gradient.shape, "gradient \(gradient.shape) for parameter \(value.shape)")
        // Slots of another shape (the parameter was replaced) restart from zero.
        var slots = (state[key] ?? [:]).filter { $0.value.shape == value.shape }
        switch kind {
        case .adamw:
            var m = slots["exp_avg"] ?? .zeros(value.shape)
            var v = slots["exp_avg_sq"] ?? .zeros(value.shape)
            let correction1 = 1 - Float(Self.power(beta1, step))
            let correction2 = 1 - Float(Self.power(beta2, step))
            for i in value.scalars.indices {
                let g = gradient.scalars[i]
                value.scalars[i] -= lr * weightDecay * value.scalars[i]
                m.scalars[i] = beta1 * m.scalars[i] + (1 - beta1) * g
                v.scalars[i] = beta2 * v.scalars[i] + (1 - beta2) * g * g
                value.scalars[i] -= lr * (m.scalars[i] / correction1) / ((v.scalars[i] / correction2).squareRoot() + epsilon)
            }
            slots["exp_avg"] = m
            slots["exp_avg_sq"] = v
        case .sgd:
            var g = gradient
            if weightDecay != 0 { g.add(value, scaledBy: weightDecay) }
            if momentum != 0 {
                var buffer = slots["momentum_buffer"] ?? g
                if slots["momentum_buffer"] != nil { buffer = buffer * momentum + g }
                slots["momentum_buffer"] = buffer
                if nesterov { g.add(buffer, scaledBy: momentum) } else { g = buffer }
            }
            value.add(g, scaledBy: -lr)
        }
        state[key] = slots
    }

    /// baseᵗ in Double.
    private static func power(_ base: Float, _ exponent: Int) -> Double {
        var result = 1.0
        for _ in 0..<exponent { result *= Double(base) }
        return result
    }
}
