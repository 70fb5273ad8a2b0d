import Dispatch

/// Splits work over the engine's threads: `0..<count` cut into contiguous ranges, one per
/// worker, run concurrently. The thread count is OpenBLAS's (``BLASThreads``), so the
/// engine's own loops and its GEMMs use the same cores; the split depends only on `count`
/// and that thread count, so results (per-worker partial sums included) are deterministic.
public enum ParallelRanges {
    /// Work items (elements touched) below which one worker runs everything: a thread
    /// hand-off costs more than a pass over this many floats.
    static let minimumWorkPerWorker = 1 << 15

    /// How many workers `count` items of `workPerItem` elements each get.
    public static func workers(count: Int, workPerItem: Int) -> Int {
        let byWork = count * Swift.max(workPerItem, 1) / minimumWorkPerWorker
        return Swift.max(1, Swift.min(BLASThreads.current, count, byWork))
    }

    /// Runs `body(range, worker)` for `workers` contiguous ranges covering `0..<count`
    /// (worker w gets the w-th range), concurrently when `workers > 1`.
    public static func run(count: Int, workers: Int, _ body: (Range<Int>, Int) -> Void) {
        guard workers > 1 else {
            if count > 0 { body(0..<count, 0) }
            return
        }
        withoutActuallyEscaping(body) { body in
            let box = UncheckedBox(body)
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                box.value((count * w / workers)..<(count * (w + 1) / workers), w)
            }
        }
    }
}

/// Carries a non-Sendable value into `concurrentPerform`'s workers; the callers hand each
/// worker disjoint output ranges (or its own partial sums).
private struct UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
