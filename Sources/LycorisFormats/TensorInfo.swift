import LycorisCore

/// One tensor's entry in a validated safetensors header.
public struct TensorInfo: Sendable, Equatable {
    /// The tensor's key in the header.
    public let name: String
    /// The element type.
    public let dtype: DType
    /// The dimensions (`[]` for a 0-dim scalar). Their product times `dtype.byteSize` is
    /// `byteRange.count` (checked without overflow when the header was validated).
    public let shape: [Int]
    /// The header's `data_offsets`: the tensor's bytes, relative to the start of the data buffer
    /// (which begins at file offset ``SafetensorsHeader/dataStart``), end exclusive.
    public let byteRange: Range<Int>

    public init(name: String, dtype: DType, shape: [Int], byteRange: Range<Int>) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteRange = byteRange
    }

    /// The number of elements (`byteRange.count / dtype.byteSize`; 1 for a 0-dim scalar).
    public var elementCount: Int { byteRange.count / dtype.byteSize }

    /// The number of bytes of data.
    public var byteCount: Int { byteRange.count }
}
