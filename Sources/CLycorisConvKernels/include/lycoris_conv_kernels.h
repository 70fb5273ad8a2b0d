/* Direct (im2col-free) correlation kernels behind LycorisCore's DirectConvolution: a
 * stride-1 convolution over a zero-padded input laid out so that every kernel tap is a
 * fixed offset, vectorised with AVX-512, AVX2+FMA or SSE (chosen at run time by the caller
 * through lycoris_conv_best_level). The levels add the same terms in the same order per
 * vector lane; AVX2 and AVX-512 round each product-add once (FMA), SSE twice. */
#ifndef LYCORIS_CONV_KERNELS_H
#define LYCORIS_CONV_KERNELS_H

/* Column ranges given to lycoris_conv_correlate start at multiples of this and are
 * computed in whole blocks of it (every level's block divides it). */
#define LYCORIS_CONV_COLUMN_BLOCK 48
/* Output rows of lycoris_conv_correlate and lycoris_conv_weight_gradient come in multiples
 * of this (rows past the real ones are computed from zero weights / zero gradients). */
#define LYCORIS_CONV_ROW_BLOCK 8

/* 0: portable (SSE2 vectors), 1: AVX2 + FMA, 2: AVX-512F — the highest this CPU runs. */
int lycoris_conv_best_level(void);

/* out[o·ldo + n] = Σ_{c < channels} Σ_{t < taps} w[(c·taps + t)·rows + o] · in[c·ldi + n + offsets[t]]
 * for o < rows (a multiple of LYCORIS_CONV_ROW_BLOCK) and n in [n0, n1) rounded up to whole
 * column blocks (n0 a multiple of LYCORIS_CONV_COLUMN_BLOCK); every `in` element read must
 * exist. Summation: per output, channel-major then tap, in float. */
void lycoris_conv_correlate(int level, float *out, long ldo, const float *in, long ldi, const float *w, long rows,
                            long channels, const long *offsets, long taps, long n0, long n1);

/* gw[o·ldgw + j] (+)= Σ_{n < count} g[o·ldg + n] · in[columns[j] + n] for o < rows (a
 * multiple of LYCORIS_CONV_ROW_BLOCK) and j in [j0, j1); count a multiple of
 * LYCORIS_CONV_COLUMN_BLOCK; `accumulate` adds to gw instead of overwriting it. Summation:
 * per lane over n in float, then the lanes. */
void lycoris_conv_weight_gradient(int level, float *gw, long ldgw, const float *g, long ldg, long rows,
                                  const float *in, const long *columns, long j0, long j1, long count,
                                  int accumulate);

#endif
