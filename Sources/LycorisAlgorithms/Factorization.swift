/// LyCORIS's `factorization(dim, factor)`: splits `dimension` into (m, n), m ≤ n, m·n = dim.
///
/// With `factor > 0` dividing `dimension`: (min(f, dim/f), max(f, dim/f)). Otherwise
/// (a negative factor means "no bound"): start at (1, dim) and walk the divisors m upwards,
/// accepting (m, dim/m) while m + n does not grow and m ≤ factor.
/// Examples: 1024 → (32, 32), 320 → (16, 20), 360 with factor 16 → (15, 24).
public func factorization(_ dimension: Int, factor: Int = -1) -> (m: Int, n: Int) {
    if factor > 0 && dimension % factor == 0 {
        let other = dimension / factor
        return (Swift.min(factor, other), Swift.max(factor, other))
    }
    let bound = factor < 0 ? dimension : factor
    var (m, n) = (1, dimension)
    let length = m + n
    while m < n {
        var next = m + 1
        while dimension % next != 0 { next += 1 }
        let other = dimension / next
        if next + other > length || next > bound { break }
        (m, n) = (next, other)
    }
    return (Swift.min(m, n), Swift.max(m, n))
}

/// LyCORIS's `power2factorization(dim, factor)` (BOFT's butterfly): dim = b·n with b even,
/// b ≤ factor (−1: no bound) and n a power of two; of the even divisors b tried upwards,
/// the last one whose n is a power of two wins. nil where none exists.
/// Examples: 64 with factor 4 → (4, 16); 20 with factor 4 → (nil: 20/2 = 10 and 20/4 = 5).
public func power2Factorization(_ dimension: Int, factor: Int = -1) -> (blockSize: Int, blockCount: Int)? {
    let bound = factor == -1 ? dimension : factor
    var (m, n) = (0, 0)
    while m <= bound {
        m += 2
        while dimension % m != 0 && m < dimension { m += 2 }
        if m > bound { break }
        if (dimension / m).nonzeroBitCount == 1 { n = dimension / m }
    }
    return n == 0 ? nil : (dimension / n, n)
}
