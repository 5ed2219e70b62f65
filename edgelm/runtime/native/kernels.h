/* edgelm's packed linear kernel: y[m, n] = sum_k x[m, k] * W[k, n] (+ b[n]) at small m.
 *
 * W is stored in panels of 16 output columns, [P][K][16] with P = ceil(N / 16) (the last panel
 * zero-padded): the panel p, row k holds W[k, 16p .. 16p + 15]. One panel is one contiguous
 * stream of 64 K bytes, read once from memory however many rows x has, so a decode step
 * (m = 1) streams every weight exactly once, in address order, with nothing else to load.
 * A caller splits the panels between threads (edgelm_linear_panels takes a range).
 */
#ifndef EDGELM_KERNELS_H
#define EDGELM_KERNELS_H

#include <stddef.h>

#define EDGELM_PANEL 16
#define EDGELM_EXPORT __attribute__((visibility("default")))

/* Panels [p0, p1) of y = x W + b for all m rows of x (row stride k) into y (row stride n). */
EDGELM_EXPORT void edgelm_linear_panels(const float *x, size_t m, size_t k, const float *w, const float *b,
                          float *y, size_t n, size_t p0, size_t p1);

/* y = gelu(y) in place, GELU's tanh form (GPT-2's gelu_new), the PackedLinear activation. */
EDGELM_EXPORT void edgelm_gelu_tanh(float *y, size_t count);

/* Sum of n floats, read with the widest loads the CPU has: the memory-read probe of
 * edgelm.bench.machine (a read kernel as lean as the linear kernel's own). */
EDGELM_EXPORT double edgelm_read_sum(const float *x, size_t n);

/* "avx512f", "avx2" or "generic": the kernel this CPU runs. */
EDGELM_EXPORT const char *edgelm_kernel_isa(void);

#endif
