/// The temporaries of ``DeviceAdapterMath``'s calls (factor products, transposes, gradients
/// before they are copied out), carved from one device allocation with a bump pointer.
///
/// ``buffer(_:)`` hands out 256-byte-aligned pieces; ``reset()`` at the end of a call makes
/// all of them free again. Work queued on the runtime's one stream may still be using them:
/// the next call's work is queued after it, so reuse is ordered without waiting. A call that
/// needs more than the chunk gets extra allocations; at its reset the chunk is replaced by
/// one of the call's whole size (after a synchronize, since queued work uses the old one),
/// so after the largest call the workspace allocates nothing and holds one call's working
/// set — never the sum over layers.
final class DeviceWorkspace {
    let runtime: DeviceRuntime
    /// Floats per alignment unit (256 bytes).
    static let alignment = 64
    private var chunk: (address: UInt64, count: Int)?
    private var extra: [UInt64] = []
    private var used = 0

    init(runtime: DeviceRuntime) { self.runtime = runtime }

    deinit {
        try? runtime.synchronize()
        if let chunk { try? runtime.free(chunk.address) }
        for address in extra { try? runtime.free(address) }
    }

    /// Bytes held between calls.
    var bytes: Int { (chunk?.count ?? 0) * 4 }

    /// `count` floats of scratch memory, valid until ``reset()``.
    func buffer(_ count: Int) throws -> UInt64 {
        let size = (max(1, count) + Self.alignment - 1) / Self.alignment * Self.alignment
        defer { used += size }
        if let chunk, used + size <= chunk.count { return chunk.address + UInt64(used * 4) }
        let address = try runtime.allocate(size)
        extra.append(address)
        return address
    }

    /// Every buffer free again; grows the chunk to this call's size when it overflowed.
    func reset() throws {
        defer { used = 0 }
        guard !extra.isEmpty else { return }
        try runtime.synchronize()
        let needed = used
        for address in extra { try runtime.free(address) }
        extra = []
        if let chunk { try runtime.free(chunk.address) }
        chunk = nil
        chunk = (try runtime.allocate(needed), needed)
    }
}
