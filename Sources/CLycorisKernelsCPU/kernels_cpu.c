/* The CUDA kernels compiled as C (see cuda_emulation.h) and their CPU launches. */
#include "lycoris_kernels_cpu.h"
#include "../LycorisCUDA/Kernels/lycoris_kernels.cu"

void lycoris_cpu_scale(unsigned grid, unsigned block, float *out, const float *x, float s, uint64_t n) {
    LYCORIS_LAUNCH(lycoris_scale, grid, block, out, x, s, n);
}

void lycoris_cpu_hadamard(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s,
                          uint64_t n) {
    LYCORIS_LAUNCH(lycoris_hadamard, grid, block, out, a, b, s, n);
}

void lycoris_cpu_add(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s, uint64_t n) {
    LYCORIS_LAUNCH(lycoris_add, grid, block, out, a, b, s, n);
}

void lycoris_cpu_kronecker(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s,
                           uint64_t p, uint64_t q, uint64_t r, uint64_t t, uint64_t k) {
    LYCORIS_LAUNCH(lycoris_kronecker, grid, block, out, a, b, s, p, q, r, t, k);
}

void lycoris_cpu_channel_scale(unsigned grid, unsigned block, float *out, const float *x, const float *w,
                               float offset, float s, uint64_t stride, uint64_t channels, uint64_t n) {
    LYCORIS_LAUNCH(lycoris_channel_scale, grid, block, out, x, w, offset, s, stride, channels, n);
}

void lycoris_cpu_channel_dot_parts(unsigned grid, unsigned block, double *partials, const float *a, const float *b,
                                   uint64_t stride, uint64_t channels, uint64_t n, uint64_t parts) {
    LYCORIS_LAUNCH(lycoris_channel_dot_parts, grid, block, partials, a, b, stride, channels, n, parts);
}

void lycoris_cpu_sum_parts(unsigned grid, unsigned block, float *out, const double *partials, float s, uint64_t channels,
                           uint64_t parts) {
    LYCORIS_LAUNCH(lycoris_sum_parts, grid, block, out, partials, s, channels, parts);
}

void lycoris_cpu_norm_affine(unsigned grid, unsigned block, float *out, const float *x, const float *w,
                             uint64_t blocks, uint64_t length, uint64_t stride, uint64_t channels, double eps) {
    LYCORIS_LAUNCH(lycoris_norm_affine, grid, block, out, x, w, blocks, length, stride, channels, eps);
}

void lycoris_cpu_transpose(unsigned grid, unsigned block, float *out, const float *in, uint64_t batch,
                           uint64_t rows, uint64_t columns, uint64_t inner) {
    LYCORIS_LAUNCH(lycoris_transpose, grid, block, out, in, batch, rows, columns, inner);
}

void lycoris_cpu_column_copy(unsigned grid, unsigned block, float *out, const float *in, uint64_t rows,
                             uint64_t width, uint64_t out_columns, uint64_t out_first, uint64_t in_columns,
                             uint64_t in_first) {
    LYCORIS_LAUNCH(lycoris_column_copy, grid, block, out, in, rows, width, out_columns, out_first, in_columns, in_first);
}

void lycoris_cpu_dropout_mask(unsigned grid, unsigned block, float *out, float p, uint64_t n, uint64_t seed,
                              uint64_t offset) {
    LYCORIS_LAUNCH(lycoris_dropout_mask, grid, block, out, p, n, seed, offset);
}

void lycoris_cpu_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
    lycoris_philox4x32_10(counter, key, out);
}
