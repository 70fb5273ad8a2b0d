import LycorisAlgorithms
import LycorisCore
import Testing

/// The COO sparse bias of LyCORIS's low-rank + sparse extraction, read from its three tensors.
@Suite("sparse bias")
struct SparseBiasTests {
    static func tensors(rows: [Float], columns: [Float], values: [Float], size: [Float]) -> [String: Tensor] {
        ["bias_indices": Tensor(shape: [2, values.count], scalars: rows + columns),
         "bias_values": Tensor(shape: [values.count], scalars: values),
         "bias_size": Tensor(shape: [2], scalars: size)]
    }

    @Test("entries land at (row, column) of the flattened (out, in·k) matrix, reshaped to the weight")
    func dense() throws {
        let sparse = try #require(try SparseBias(Self.tensors(rows: [0, 2, 1], columns: [5, 0, 17], values: [1.5, -2, 0.25], size: [3, 18])))
        let weight = try sparse.dense(shape: [3, 2, 3, 3])
        #expect(weight.shape == [3, 2, 3, 3])
        var expected = [Float](repeating: 0, count: 54)
        expected[5] = 1.5
        expected[36] = -2
        expected[35] = 0.25
        #expect(weight.scalars == expected)
        #expect(throws: AdapterError.self) { try sparse.dense(shape: [3, 17]) }
    }

    @Test("an int16 index past 2^15 (stored negative) reads back modulo 2^16")
    func wrapped() throws {
        // Column 40000 was stored as 40000 − 65536; bias_size 40001 likewise.
        let sparse = try #require(try SparseBias(Self.tensors(rows: [1], columns: [40000 - 65536], values: [3], size: [2, 40001 - 65536])))
        #expect(sparse.size == [2, 40001] && sparse.positions == [40001 + 40000])
    }

    @Test("no keys: none; some keys, bad shapes or an entry outside bias_size: an error naming it")
    func refused() throws {
        #expect(try SparseBias(["lora_up.weight": Tensor.zeros([2, 2])]) == nil)
        var partial = Self.tensors(rows: [0], columns: [0], values: [1], size: [2, 2])
        partial["bias_size"] = nil
        #expect { try SparseBias(partial) } throws: { "\($0)".contains("bias_size") }
        #expect { try SparseBias(Self.tensors(rows: [2], columns: [0], values: [1], size: [2, 2])) } throws: { "\($0)".contains("outside") }
        var shapes = Self.tensors(rows: [0], columns: [0], values: [1], size: [2, 2])
        shapes["bias_values"] = Tensor.zeros([2])
        #expect { try SparseBias(shapes) } throws: { "\($0)".contains("(2, nnz)") }
    }
}
