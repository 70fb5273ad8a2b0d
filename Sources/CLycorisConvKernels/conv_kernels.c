/* See include/lycoris_conv_kernels.h. One source, three instruction sets: each kernel body
 * is a macro instantiated with a vector type, its lane count and a register blocking that
 * fits that set's register file (AVX-512: 32 zmm; AVX2 and SSE: 16 ymm/xmm). */
#include "lycoris_conv_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define LYCORIS_X86 1
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float v4 __attribute__((vector_size(16), aligned(4), may_alias));

/* out rows o..o+OB, columns n..n+NV·LANES: acc[b][v] += x[v] · w[b] over channels and taps. */
#define DEFINE_CORRELATE(NAME, ATTR, VEC, LANES, OB, NV)                                              \
    ATTR static void NAME(float *out, long ldo, const float *in, long ldi, const float *w, long rows,        \
                          long channels, const long *offsets, long taps, long n0, long n1) {                 \
        for (long n = n0; n < n1; n += (LANES) * (NV)) {                                                     \
            for (long o = 0; o < rows; o += (OB)) {                                                          \
                VEC acc[OB][NV];                                                                             \
                _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                            \
                    _Pragma("clang loop unroll(full)") for (int v = 0; v < (NV); v++) acc[b][v] = (VEC){0};  \
                for (long c = 0; c < channels; c++) {                                                        \
                    const float *row = in + c * ldi + n;                                                     \
                    const float *wc = w + c * taps * rows + o;                                               \
                    for (long t = 0; t < taps; t++) {                                                        \
                        const float *src = row + offsets[t];                                                 \
                        const float *wt = wc + t * rows;                                                     \
                        VEC x[NV];                                                                           \
                        _Pragma("clang loop unroll(full)") for (int v = 0; v < (NV); v++)                    \
                            x[v] = *(const VEC *)(src + v * (LANES));                                        \
                        _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++) {                  \
                            float s = wt[b];                                                                 \
                            _Pragma("clang loop unroll(full)") for (int v = 0; v < (NV); v++)                \
                                acc[b][v] += x[v] * s;                                                       \
                        }                                                                                    \
                    }                                                                                        \
                }                                                                                            \
                _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                            \
                    _Pragma("clang loop unroll(full)") for (int v = 0; v < (NV); v++)                        \
                        *(VEC *)(out + (o + b) * ldo + n + v * (LANES)) = acc[b][v];                         \
            }                                                                                                \
        }                                                                                                    \
    }

/* ∂W works on passes of WEIGHT_CHUNK columns over at most WEIGHT_ROWS rows of ∂Y: a pass reads
 * the JB input rows' chunk once for every row block (it stays in L1 across them) instead of
 * streaming each whole row from L2 once per row block. The (OB, JB) accumulators of every row
 * block carry over between passes in `part`, each lane adding its columns in the same order as
 * one long loop would, so the result is the same to the bit. */
#define WEIGHT_CHUNK 512
#define WEIGHT_ROWS 64

/* Rows o0.. (at most WEIGHT_ROWS) against weight columns j..j+JB: the sums of the lanes of
 * every accumulator, stored or added. */
#define WEIGHT_BLOCK(VEC, LANES, OB, JB)                                                                     \
    {                                                                                                        \
        long oe = o0 + WEIGHT_ROWS < rows ? o0 + WEIGHT_ROWS : rows;                                         \
        VEC part[WEIGHT_ROWS / (OB)][OB][JB];                                                                \
        for (long c0 = 0; c0 < count; c0 += WEIGHT_CHUNK) {                                                  \
            long c1 = c0 + WEIGHT_CHUNK < count ? c0 + WEIGHT_CHUNK : count;                                 \
            for (long o = o0; o < oe; o += (OB)) {                                                           \
                VEC(*p)[JB] = part[(o - o0) / (OB)];                                                         \
                VEC acc[OB][JB];                                                                             \
                _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                            \
                    _Pragma("clang loop unroll(full)") for (int k = 0; k < (JB); k++)                        \
                        acc[b][k] = c0 == 0 ? (VEC){0} : p[b][k];                                            \
                for (long n = c0; n < c1; n += (LANES)) {                                                    \
                    VEC gv[OB];                                                                              \
                    _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                        \
                        gv[b] = *(const VEC *)(g + (o + b) * ldg + n);                                       \
                    _Pragma("clang loop unroll(full)") for (int k = 0; k < (JB); k++) {                      \
                        VEC xv = *(const VEC *)(in + columns[j + k] + n);                                    \
                        _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                    \
                            acc[b][k] += gv[b] * xv;                                                         \
                    }                                                                                        \
                }                                                                                            \
                _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                            \
                    _Pragma("clang loop unroll(full)") for (int k = 0; k < (JB); k++) p[b][k] = acc[b][k];   \
            }                                                                                                \
        }                                                                                                    \
        for (long o = o0; o < oe; o += (OB)) {                                                               \
            VEC(*p)[JB] = part[(o - o0) / (OB)];                                                             \
            _Pragma("clang loop unroll(full)") for (int b = 0; b < (OB); b++)                                \
                _Pragma("clang loop unroll(full)") for (int k = 0; k < (JB); k++) {                          \
                    float sum = 0;                                                                           \
                    _Pragma("clang loop unroll(full)") for (int l = 0; l < (LANES); l++) sum += p[b][k][l];  \
                    float *target = gw + (o + b) * ldgw + j + k;                                             \
                    *target = accumulate ? *target + sum : sum;                                              \
                }                                                                                            \
        }                                                                                                    \
    }

#define DEFINE_WEIGHT(NAME, ATTR, VEC, LANES, OB, JB)                                                        \
    ATTR static void NAME(float *gw, long ldgw, const float *g, long ldg, long rows, const float *in,        \
                          const long *columns, long j0, long j1, long count, int accumulate) {               \
        /* Weight columns outer: their input rows stay in cache across the row blocks. */                  \
        long j = j0;                                                                                         \
        for (; j + (JB) <= j1; j += (JB))                                                                    \
            for (long o0 = 0; o0 < rows; o0 += WEIGHT_ROWS) WEIGHT_BLOCK(VEC, LANES, OB, JB)                 \
        for (; j < j1; j++)                                                                                  \
            for (long o0 = 0; o0 < rows; o0 += WEIGHT_ROWS) WEIGHT_BLOCK(VEC, LANES, OB, 1)                  \
    }

#ifdef LYCORIS_X86
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
DEFINE_CORRELATE(correlate_avx512, AVX512, v16, 16, 8, 3)
DEFINE_CORRELATE(correlate_avx2, AVX2, v8, 8, 4, 3)
DEFINE_WEIGHT(weight_avx512, AVX512, v16, 16, 4, 6)
DEFINE_WEIGHT(weight_avx2, AVX2, v8, 8, 2, 4)
#endif
DEFINE_CORRELATE(correlate_portable, , v4, 4, 4, 3)
DEFINE_WEIGHT(weight_portable, , v4, 4, 2, 4)

int lycoris_conv_best_level(void) {
#ifdef LYCORIS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

void lycoris_conv_correlate(int level, float *out, long ldo, const float *in, long ldi, const float *w, long rows,
                            long channels, const long *offsets, long taps, long n0, long n1) {
#ifdef LYCORIS_X86
    if (level >= 2) {
        correlate_avx512(out, ldo, in, ldi, w, rows, channels, offsets, taps, n0, n1);
        return;
    }
    if (level == 1) {
        correlate_avx2(out, ldo, in, ldi, w, rows, channels, offsets, taps, n0, n1);
        return;
    }
#endif
    correlate_portable(out, ldo, in, ldi, w, rows, channels, offsets, taps, n0, n1);
}

void lycoris_conv_weight_gradient(int level, float *gw, long ldgw, const float *g, long ldg, long rows,
                                  const float *in, const long *columns, long j0, long j1, long count,
                                  int accumulate) {
#ifdef LYCORIS_X86
    if (level >= 2) {
        weight_avx512(gw, ldgw, g, ldg, rows, in, columns, j0, j1, count, accumulate);
        return;
    }
    if (level == 1) {
        weight_avx2(gw, ldgw, g, ldg, rows, in, columns, j0, j1, count, accumulate);
        return;
    }
#endif
    weight_portable(gw, ldgw, g, ldg, rows, in, columns, j0, j1, count, accumulate);
}
