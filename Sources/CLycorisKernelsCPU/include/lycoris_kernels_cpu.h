/* The CUDA backend's kernels (Sources/LycorisCUDA/Kernels/lycoris_kernels.cu) launched on the
 * CPU through cuda_emulation.h: each function is kernel<<<grid, block>>>(arguments…) with the
 * kernel's own arguments. Used by the tests of their index arithmetic and by LycorisDevice's
 * EmulatedDevice (the test device: one launch at a time, no threads). */
#ifndef LYCORIS_KERNELS_CPU_H
#define LYCORIS_KERNELS_CPU_H

#include <stdint.h>

void lycoris_cpu_scale(unsigned grid, unsigned block, float *out, const float *x, float s, uint64_t n);
void lycoris_cpu_hadamard(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s,
                          uint64_t n);
void lycoris_cpu_add(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s, uint64_t n);
void lycoris_cpu_kronecker(unsigned grid, unsigned block, float *out, const float *a, const float *b, float s,
                           uint64_t p, uint64_t q, uint64_t r, uint64_t t, uint64_t k);
void lycoris_cpu_channel_scale(unsigned grid, unsigned block, float *out, const float *x, const float *w,
                               float offset, float s, uint64_t stride, uint64_t channels, uint64_t n);
void lycoris_cpu_channel_dot_parts(unsigned grid, unsigned block, double *partials, const float *a, const float *b,
                                   uint64_t stride, uint64_t channels, uint64_t n, uint64_t parts);
void lycoris_cpu_sum_parts(unsigned grid, unsigned block, float *out, const double *partials, float s, uint64_t channels,
                           uint64_t parts);
void lycoris_cpu_norm_affine(unsigned grid, unsigned block, float *out, const float *x, const float *w,
                             uint64_t blocks, uint64_t length, uint64_t stride, uint64_t channels, double eps);
void lycoris_cpu_transpose(unsigned grid, unsigned block, float *out, const float *in, uint64_t batch,
                           uint64_t rows, uint64_t columns, uint64_t inner);
void lycoris_cpu_column_copy(unsigned grid, unsigned block, float *out, const float *in, uint64_t rows,
                             uint64_t width, uint64_t out_columns, uint64_t out_first, uint64_t in_columns,
                             uint64_t in_first);
void lycoris_cpu_dropout_mask(unsigned grid, unsigned block, float *out, float p, uint64_t n, uint64_t seed,
                              uint64_t offset);
/* The generator itself (one call), for its known-answer test. */
void lycoris_cpu_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

#endif
