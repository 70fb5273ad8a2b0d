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
