import COpenBLAS

/// A thin singular value decomposition A ≈ U · diag(S) · Vᵀ of a row-major (m, n) matrix:
/// U (m, k) with orthonormal columns, S (k) descending, Vt (k, n) with orthonormal rows.
/// k = min(m, n) for ``Tensor/singularValueDecomposition()``, the requested rank for
/// ``Tensor/randomizedSingularValueDecomposition(rank:oversampling:powerIterations:seed:)``.
public struct SingularValueDecomposition: Sendable {
    public var u: Tensor
    public var s: [Float]
    public var vt: Tensor

    public init(u: Tensor, s: [Float], vt: Tensor) {
        self.u = u
        self.s = s
        self.vt = vt
    }

    /// U[:, :r] · diag(S[:r]) (m, r) — LyCORIS's `lora_up` — and Vt[:r] (r, n), its `lora_down`.
    public func factors(rank r: Int) -> (up: Tensor, down: Tensor) {
        let (m, n) = (u.shape[0], vt.shape[1])
        var up = Tensor.zeros([m, r])
        for row in 0..<m {
            for column in 0..<r { up.scalars[row * r + column] = u.scalars[row * u.shape[1] + column] * s[column] }
        }
        return (up, Tensor(shape: [r, n], scalars: Array(vt.scalars[0..<(r * n)])))
    }
}

/// LAPACK failed (`info` ≠ 0), e.g. on non-finite input.
public struct LAPACKError: Error, CustomStringConvertible, Sendable {
    public let routine: String
    public let info: Int
    public var description: String { "\(routine) failed with info \(info)\(info > 0 ? " (no convergence)" : " (bad argument)")" }
}

/// LAPACK's `?gesdd_` over its element type (`sgesdd_` for Float, `dgesdd_` for Double):
/// jobz, m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork, iwork, info, jobz's hidden length.
private typealias DivideAndConquerSVD<T> = (UnsafePointer<CChar>?, UnsafePointer<Int32>?, UnsafePointer<Int32>?,
                                    UnsafeMutablePointer<T>?, UnsafePointer<Int32>?, UnsafeMutablePointer<T>?,
                                    UnsafeMutablePointer<T>?, UnsafePointer<Int32>?, UnsafeMutablePointer<T>?,
                                    UnsafePointer<Int32>?, UnsafeMutablePointer<T>?, UnsafePointer<Int32>?,
                                    UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?, Int) -> Void

extension Tensor {
    /// The exact thin SVD by LAPACK `sgesdd` (divide and conquer).
    public func singularValueDecomposition() throws -> SingularValueDecomposition {
        try Self.thinSVD(scalars, shape: shape, routine: "sgesdd", sgesdd_) { $0 }
    }

    /// The exact thin SVD computed in double precision by LAPACK `dgesdd`, rounded to Float
    /// at the end: for factors that must not carry float32 rounding noise of the
    /// decomposition itself (T-LoRA's frozen term).
    public func doublePrecisionSingularValueDecomposition() throws -> SingularValueDecomposition {
        try Self.thinSVD(scalars.map(Double.init), shape: shape, routine: "dgesdd", dgesdd_) { $0.map(Float.init) }
    }

    /// U (m, k), S (k) and Vt (k, n), k = min(m, n), of the row-major (m, n) matrix `a` by
    /// `gesdd` in T's precision. LAPACK is column-major, so the buffer is passed as the
    /// column-major (n, m) matrix Aᵀ = V·S·Uᵀ: its left factor, read row-major, is Vt (k, n)
    /// and its right factor is U (m, k). `float` turns T's results into the Float factors.
    private static func thinSVD<T: BinaryFloatingPoint>(_ a: [T], shape: [Int], routine: String,
                                                       _ gesdd: DivideAndConquerSVD<T>,
                                                       float: ([T]) -> [Float]) throws -> SingularValueDecomposition {
        precondition(shape.count == 2, "an SVD needs a matrix, not shape \(shape)")
        let (m, n) = (shape[0], shape[1]), k = Swift.min(m, n)
        var a = a
        var s = [T](repeating: 0, count: k)
        var left = [T](repeating: 0, count: n * k)    // column-major (n, k): Vt row-major
        var right = [T](repeating: 0, count: k * m)   // column-major (k, m): U row-major
        var (rows, columns, lda, ldu, ldvt) = (Int32(n), Int32(m), Int32(n), Int32(n), Int32(k))
        var iwork = [Int32](repeating: 0, count: 8 * k)
        var info: Int32 = 0
        var query: T = 0
        var lwork: Int32 = -1
        var jobz: CChar = 83  // "S": the k leading vectors
        gesdd(&jobz, &rows, &columns, &a, &lda, &s, &left, &ldu, &right, &ldvt, &query, &lwork, &iwork, &info, 1)
        guard info == 0 else { throw LAPACKError(routine: routine, info: Int(info)) }
        lwork = Int32(query)
        var work = [T](repeating: 0, count: Int(lwork))
        gesdd(&jobz, &rows, &columns, &a, &lda, &s, &left, &ldu, &right, &ldvt, &work, &lwork, &iwork, &info, 1)
        guard info == 0 else { throw LAPACKError(routine: routine, info: Int(info)) }
        return SingularValueDecomposition(u: Tensor(shape: [m, k], scalars: float(right)), s: float(s),
                                          vt: Tensor(shape: [k, n], scalars: float(left)))
    }

    /// The leading `rank` singular triplets by a randomised range finder (Halko, Martinsson
    /// & Tropp 2011, Alg. 4.4 + 5.1): Y = A·Ω with Ω (n, l) Gaussian, l = rank + oversampling
    /// (default max(10, rank/2)),
    /// `powerIterations` rounds of Y ← A·(Aᵀ·Q) re-orthonormalised in between, Q an
    /// orthonormal basis of Y, then the exact SVD of the small B = Qᵀ·A = Ub·S·Vt and
    /// U = Q·Ub. The range finder costs ~4·(q + 1)·m·n·l flops, the exact SVD ~4·m·n·min(m, n),
    /// so this falls back to the exact SVD when min(m, n) ≤ (q + 1)·l — also where a rank that
    /// is a large part of a noisy spectrum makes the range finder least exact. With q = 3 and
    /// l = 1.5·rank the reconstruction error ‖A − U·S·Vt‖_F stays within 1% of the exact
    /// truncation's on low-rank-plus-noise matrices (SD-sized layers, ranks 32–64).
    public func randomizedSingularValueDecomposition(rank wanted: Int, oversampling: Int? = nil, powerIterations: Int = 3,
                                                     seed: UInt64 = 0) throws -> SingularValueDecomposition {
        precondition(rank == 2 && wanted > 0, "a randomised SVD needs a matrix and a positive rank")
        let (m, n) = (shape[0], shape[1])
        let width = wanted + (oversampling ?? Swift.max(10, wanted / 2))
        guard (powerIterations + 1) * width < Swift.min(m, n) else {
            var exact = try singularValueDecomposition()
            exact.truncate(to: Swift.min(wanted, exact.s.count))
            return exact
        }
        var random = RandomSource(seed: seed)
        var omega = Tensor.zeros([n, width])
        for index in omega.scalars.indices { omega.scalars[index] = random.normal() }
        var q = try Tensor.matmul(self, omega).orthonormalColumns()
        for _ in 0..<powerIterations {
            let z = try Tensor.matmul(self, transposeA: true, q).orthonormalColumns()   // (n, l)
            q = try Tensor.matmul(self, z).orthonormalColumns()                         // (m, l)
        }
        let small = try Tensor.matmul(q, transposeA: true, self).singularValueDecomposition()   // B (l, n)
        var result = SingularValueDecomposition(u: Tensor.matmul(q, small.u), s: small.s, vt: small.vt)
        result.truncate(to: wanted)
        return result
    }

    /// An orthonormal basis of the columns of a tall (m, l) matrix: the U of its thin SVD.
    func orthonormalColumns() throws -> Tensor { try singularValueDecomposition().u }
}

extension SingularValueDecomposition {
    /// Keeps the leading `r` triplets.
    mutating func truncate(to r: Int) {
        let (m, k, n) = (u.shape[0], u.shape[1], vt.shape[1])
        guard r < k else { return }
        var newU = Tensor.zeros([m, r])
        for row in 0..<m {
            for column in 0..<r { newU.scalars[row * r + column] = u.scalars[row * k + column] }
        }
        u = newU
        s = Array(s[0..<r])
        vt = Tensor(shape: [r, n], scalars: Array(vt.scalars[0..<(r * n)]))
    }
}
