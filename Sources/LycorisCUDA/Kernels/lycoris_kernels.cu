/* The elementwise kernels of the CUDA backend (issue 8), in the C subset that both NVRTC and a
 * C compiler accept: compiled for the GPU by NVRTC (--gpu-architecture=compute_90, see
 * Tests/LycorisCUDATests/KernelTests.swift), and compiled as C with cuda_emulation.h
 * (Sources/CLycorisKernelsCPU), which runs every block and thread of a launch one after the
 * other, so the index arithmetic below is checked on the CPU against the CPU engine.
 *
 * Every kernel is one thread per output element (or per normalised block for
 * lycoris_norm_affine), with the 1-D launch i = blockIdx.x·blockDim.x + threadIdx.x and
 * grid = ⌈count / block⌉; threads past the end return. Tensors are row-major float32.
 * The GEMMs (LoRA's up·down, LoHa's two products, Tucker's mode products) go to cuBLAS;
 * Tucker's reshapes between them are lycoris_transpose. Sources/LycorisDevice launches them
 * (DeviceKernel) on a CUDA stream, or on the CPU through this same text for its emulated
 * device.
 *
 * NOT YET RUN ON A GPU: these compile with NVRTC and their arithmetic is tested on the CPU. */

#ifdef __CUDACC__
#define LYCORIS_KERNEL extern "C" __global__
#define LYCORIS_DEVICE __device__ static
#else
#include "cuda_emulation.h"
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

#define LYCORIS_INDEX() ((u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x)

/* out = s · x   (the scale of ΔW: α/r · multiplier) */
LYCORIS_KERNEL void lycoris_scale(float *out, const float *x, float s, u64 n) {
    u64 i = LYCORIS_INDEX();
    if (i < n) out[i] = s * x[i];
}

/* out = s · (a ⊙ b)   (LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · scale; its backward is the same
 * product with the other factor) */
LYCORIS_KERNEL void lycoris_hadamard(float *out, const float *a, const float *b, float s, u64 n) {
    u64 i = LYCORIS_INDEX();
    if (i < n) out[i] = s * a[i] * b[i];
}

/* out = a + s · b   (GLoRA: ΔW = W0·A + B, the two terms added) */
LYCORIS_KERNEL void lycoris_add(float *out, const float *a, const float *b, float s, u64 n) {
    u64 i = LYCORIS_INDEX();
    if (i < n) out[i] = a[i] + s * b[i];
}

/* out = s · kron(A, B): A (p, q), B (r, t, k) → out (p·r, q·t, k) with
 * out[i·r + j, l·t + m, κ] = s · A[i, l] · B[j, m, κ]   (LoKr's ΔW; k = Π kernel axes, 1 for
 * linear) */
LYCORIS_KERNEL void lycoris_kronecker(float *out, const float *a, const float *b, float s,
                                      u64 p, u64 q, u64 r, u64 t, u64 k) {
    u64 index = LYCORIS_INDEX();
    if (index >= p * r * q * t * k) return;
    u64 kappa = index % k;
    u64 column = index / k % (q * t);
    u64 row = index / (k * q * t);
    u64 i = row / r, j = row % r, l = column / t, m = column % t;
    out[index] = s * a[i * q + l] * b[(j * t + m) * k + kappa];
}

/* out[e] = x[e] · (offset + s · w[⌊e / stride⌋ mod channels])   — a per-channel scale along
 * any axis: IA3's m·ΔW = W0 ⊙ (m·w) (offset 0, s = m) or W' = W0 ⊙ (1 + m·w) (offset 1), rows
 * (stride = Π later axes) or columns; a rank-dropout mask on ΔW's rows (offset 0, s = 1); the
 * norm adapter's affine x̂ ⊙ W (stride 1 for layer norm, Π spatial for group norm). */
LYCORIS_KERNEL void lycoris_channel_scale(float *out, const float *x, const float *w, float offset, float s,
                                          u64 stride, u64 channels, u64 n) {
    u64 e = LYCORIS_INDEX();
    if (e < n) out[e] = x[e] * (offset + s * w[e / stride % channels]);
}

/* The reduction of lycoris_channel_scale, Σ a[e]·b[e] over the elements e of each channel c
 * (⌊e / stride⌋ mod channels = c), in two launches so that every channel is summed by
 * `parts` threads: IA3's ∂w = m · Σ ∂(m·ΔW) ⊙ W0 along its axis, and with one channel and
 * stride 1 a dot product (use_scalar's ∂σ). Thread t = c·parts + j sums, in double, the
 * stride-long runs of channel c that start at (o·channels + c)·stride for o ≡ j (mod parts)
 * — for a dot product, elements j, j + parts, … (adjacent threads read adjacent elements). */
LYCORIS_KERNEL void lycoris_channel_dot_parts(double *partials, const float *a, const float *b, u64 stride,
                                              u64 channels, u64 n, u64 parts) {
    u64 t = LYCORIS_INDEX();
    if (t >= channels * parts) return;
    u64 c = t / parts, j = t % parts, o, e;
    double sum = 0;
    for (o = j; (o * channels + c) * stride < n; o += parts) {
        u64 start = (o * channels + c) * stride;
        for (e = start; e < start + stride; e++) sum += (double)a[e] * (double)b[e];
    }
    partials[t] = sum;
}

/* out[c] = s · Σ_j partials[c·parts + j]   (the second launch of the channel reduction). */
LYCORIS_KERNEL void lycoris_sum_parts(float *out, const double *partials, float s, u64 channels, u64 parts) {
    u64 c = LYCORIS_INDEX(), j;
    if (c >= channels) return;
    double sum = 0;
    for (j = 0; j < parts; j++) sum += partials[c * parts + j];
    out[c] = (float)((double)s * sum);
}

/* Normalised blocks times the affine weight, as LycorisCore's Normalization.forward: for each
 * block of `length` contiguous elements (one thread per block), μ and σ² (biased) in double,
 * out[e] = (x[e] − μ)/√(σ² + eps) · w[⌊e / stride⌋ mod channels]. */
LYCORIS_KERNEL void lycoris_norm_affine(float *out, const float *x, const float *w, u64 blocks, u64 length,
                                        u64 stride, u64 channels, double eps) {
    u64 block = LYCORIS_INDEX();
    if (block >= blocks || length == 0) return;
    u64 start = block * length, e;
    double sum = 0, squares = 0;
    for (e = start; e < start + length; e++) sum += (double)x[e];
    double mean = sum / (double)length;
    for (e = start; e < start + length; e++) squares += ((double)x[e] - mean) * ((double)x[e] - mean);
    double rstd = 1.0 / sqrt(squares / (double)length + eps);
    for (e = start; e < start + length; e++)
        out[e] = (float)(((double)x[e] - mean) * rstd * (double)w[e / stride % channels]);
}

/* The two middle axes of in (batch, rows, columns, inner) swapped: out (batch, columns, rows,
 * inner) — a batch of matrix transposes whose elements are blocks of `inner` floats (inner 1:
 * plain transposes). Tucker's reshapes between its mode products (ΔW[o, i, κ] =
 * Σ_ab t[a, b, κ] · up[o, a] · down[b, i]) and the Kronecker product's backward, which views
 * ∂ΔW (p·r, q·t·k) as (p, r, q, t·k). */
LYCORIS_KERNEL void lycoris_transpose(float *out, const float *in, u64 batch, u64 rows, u64 columns,
                                      u64 inner) {
    u64 index = LYCORIS_INDEX();
    if (index >= batch * rows * columns * inner) return;
    u64 element = index % inner, block = index / inner;
    u64 matrix = block / (rows * columns), within = block % (rows * columns);
    u64 row = within / columns, column = within % columns;
    out[((matrix * columns + column) * rows + row) * inner + element] = in[index];
}

/* out[row, outFirst + c] = in[row, inFirst + c] for c < width, rows of `outColumns` and
 * `inColumns` floats: DyLoRA's rank block taken out of lora_up (out, r) and its gradient put
 * back into a zeroed (out, r); the other elements of out are left alone. */
LYCORIS_KERNEL void lycoris_column_copy(float *out, const float *in, u64 rows, u64 width, u64 outColumns,
                                        u64 outFirst, u64 inColumns, u64 inFirst) {
    u64 index = LYCORIS_INDEX();
    if (index >= rows * width) return;
    u64 row = index / width, c = index % width;
    out[row * outColumns + outFirst + c] = in[row * inColumns + inFirst + c];
}

/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
 * counter-based generator, so a mask element depends only on (seed, its index), not on the
 * launch shape. Round: (L, R) products of the counter words with the multipliers M0, M1;
 * the key is bumped by the Weyl constants W0, W1 between rounds. */
LYCORIS_DEVICE void lycoris_philox4x32_10(const u32 counter[4], const u32 key[2], u32 out[4]) {
    u32 c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    u32 k0 = key[0], k1 = key[1];
    int round;
    for (round = 0; round < 10; round++) {
        u64 p0 = (u64)0xD2511F53u * c0, p1 = (u64)0xCD9E8D57u * c2;
        u32 h0 = (u32)(p0 >> 32), l0 = (u32)p0, h1 = (u32)(p1 >> 32), l1 = (u32)p1;
        c0 = h1 ^ c1 ^ k0;
        c1 = l1;
        c2 = h0 ^ c3 ^ k1;
        c3 = l0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Dropout mask: out[e] = 1/(1 − p) where the uniform u_e ≥ p, else 0; u_e = word (e mod 4) of
 * Philox4x32-10(counter = (⌊e/4⌋ + offset, 0, 0, 0) split into 32-bit words, key = seed) / 2³².
 * `offset` (in blocks of 4) lets successive masks of one seed not overlap. */
LYCORIS_KERNEL void lycoris_dropout_mask(float *out, float p, u64 n, u64 seed, u64 offset) {
    u64 e = LYCORIS_INDEX();
    if (e >= n) return;
    u64 block = e / 4 + offset;
    u32 counter[4] = {(u32)block, (u32)(block >> 32), 0u, 0u};
    u32 key[2] = {(u32)seed, (u32)(seed >> 32)};
    u32 words[4];
    lycoris_philox4x32_10(counter, key, words);
    float u = (float)words[e % 4] * 2.3283064365386963e-10f; /* 2^-32 */
    out[e] = u >= p ? 1.0f / (1.0f - p) : 0.0f;
}
