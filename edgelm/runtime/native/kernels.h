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
#include <stdint.h>
#include <string.h>

#define EDGELM_PANEL 16
#define EDGELM_EXPORT __attribute__((visibility("default")))

/* Panels [p0, p1) of y = x W + b for all m rows of x (row stride k) into y (row stride n). */
EDGELM_EXPORT void edgelm_linear_panels(const float *x, size_t m, size_t k, const float *w, const float *b,
                          float *y, size_t n, size_t p0, size_t p1);

/* Panels [p0, p1) of W (K x N, element (r, j) at src[r * sk + j * sj]) into dst, laid out [P][K][16]
 * as edgelm_linear_panels reads them, the last panel's columns past N zero: a weight stored [K, N]
 * (sk = N, sj = 1) or [N, K], as a 1x1 Conv keeps it (sk = 1, sj = K). dst is the whole panel array. */
EDGELM_EXPORT void edgelm_pack_panels(const float *src, size_t k, size_t n, size_t sk, size_t sj, float *dst,
                                      size_t p0, size_t p1);

/* The residual stream's LayerNorm before a PackedLinear (ONNX Runtime's SkipLayerNormalization):
 * for each of m rows of k, h = x (+ skip) (+ skip_bias) into `sum` (may be NULL), then
 * out = (h - mean(h)) / sqrt(var(h) + eps) * gamma (+ beta); mean and variance in double. */
EDGELM_EXPORT void edgelm_skip_layer_norm(const float *x, const float *skip, const float *skip_bias, const float *gamma,
                                          const float *beta, float eps, size_t m, size_t k, float *sum, float *out);

/* y = gelu(y) in place, GELU's tanh form (GPT-2's gelu_new), the PackedLinear activation. */
EDGELM_EXPORT void edgelm_gelu_tanh(float *y, size_t count);

/* Sum of n floats, read with the widest loads the CPU has, as 4 streams (quarters of x) in lockstep:
 * the memory-read probe of edgelm.bench.machine (a read kernel as lean as the linear kernel's own). */
EDGELM_EXPORT double edgelm_read_sum(const float *x, size_t n);

/* Sum of chunks first, first + step, ... of `chunk` floats of x[0, n) (the last may be short), each
 * read by edgelm_read_sum: with first = thread index and step = threads, every core reads its own
 * chunks while all of them stay within a few chunks of one another, as the decode's threads do
 * within a layer's projections. */
EDGELM_EXPORT double edgelm_read_chunks(const float *x, size_t n, size_t chunk, size_t first, size_t step);

/* exp(a), a clamped to [-87, 87]: exp(a) = 2^j exp(r), j = round(a / ln 2), r = a - j ln 2 in two
 * parts (Cody-Waite, so r keeps its low bits), |r| <= ln 2 / 2, and exp(r) by its Taylor series to
 * r^7 / 7! (truncation below 1e-8). Branch-free; edgelm_exp4 and edgelm_exp8 below are the same on 4
 * and 8 lanes. */
#define EDGELM_LOG2E 1.4426950408889634f
#define EDGELM_LN2_HI 0.693145751953125f
#define EDGELM_LN2_LO 1.428606765330187e-06f
/* exp(r) for |r| <= ln 2 / 2, Horner's form; r a float or a GCC/Clang vector of floats */
#define EDGELM_EXP_SERIES(r) \
    ((((((((r) * (1.0f / 5040) + 1.0f / 720) * (r) + 1.0f / 120) * (r) + 1.0f / 24) * (r) + 1.0f / 6) * (r) + 0.5f) * (r) + 1.0f) * (r) + 1.0f)
static inline float edgelm_exp(float a) {
    a = a < -87.0f ? -87.0f : (a > 87.0f ? 87.0f : a);
    float j = __builtin_nearbyintf(a * EDGELM_LOG2E);
    float r = (a - j * EDGELM_LN2_HI) - j * EDGELM_LN2_LO;
    float e = EDGELM_EXP_SERIES(r);
    union { int32_t i; float f; } scale = {.i = ((int32_t)j + 127) << 23};
    return e * scale.f;
}

/* 4-lane vectors for the portable kernels: GCC and Clang vector types, NEON on ARM, SSE on an x86
 * without AVX2. Unlike plain float arrays, their sums stay in registers. */
typedef float edgelm_v4 __attribute__((vector_size(16)));
typedef int32_t edgelm_v4i __attribute__((vector_size(16)));

static inline edgelm_v4 edgelm_load4(const float *p) {
    edgelm_v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void edgelm_store4(float *p, edgelm_v4 v) { memcpy(p, &v, sizeof v); }

static inline float edgelm_sum4(edgelm_v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/* edgelm_exp on 4 lanes; it rounds a / ln 2 to the nearest integer by adding and taking away
 * 1.5 * 2^23 (exact for |a / ln 2| <= 126, which the clamp ensures) */
static inline edgelm_v4 edgelm_exp4(edgelm_v4 a) {
    const edgelm_v4 lo = {-87.0f, -87.0f, -87.0f, -87.0f}, hi = {87.0f, 87.0f, 87.0f, 87.0f};
    edgelm_v4i below = a < lo, above = a > hi;  /* all ones where true */
    a = (edgelm_v4)(((edgelm_v4i)a & ~below) | ((edgelm_v4i)lo & below));
    a = (edgelm_v4)(((edgelm_v4i)a & ~above) | ((edgelm_v4i)hi & above));
    edgelm_v4 j = (a * EDGELM_LOG2E + 12582912.0f) - 12582912.0f;
    edgelm_v4 r = (a - j * EDGELM_LN2_HI) - j * EDGELM_LN2_LO;
    edgelm_v4 e = EDGELM_EXP_SERIES(r);
    edgelm_v4i scale = (__builtin_convertvector(j, edgelm_v4i) + 127) << 23;
    return e * (edgelm_v4)scale;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
/* edgelm_exp on 8 lanes, for callers compiled for AVX2 + FMA */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 edgelm_exp8(__m256 a) {
    a = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
    __m256 j = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(EDGELM_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(j, _mm256_set1_ps(EDGELM_LN2_HI), a);
    r = _mm256_fnmadd_ps(j, _mm256_set1_ps(EDGELM_LN2_LO), r);
    __m256 e = _mm256_set1_ps(1.0f / 5040);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 720));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 120));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 24));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 6));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(j), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e, _mm256_castsi256_ps(scale));
}
#endif

/* Attention over a KV cache that it appends to in place: ai.edgelm.CachedAttention (ops.c has the
 * contract). One call computes `unit` = b * kv_heads + g: batch row b, KV head g and the query heads
 * that share it; units touch disjoint parts of the cache and output, so threads take them freely. */
typedef struct {
    const float *qkv;                  /* (B, S, (N + 2 Nkv) H): queries, keys, values of the new tokens */
    const float *past_k, *past_v;      /* (B, Nkv, C, H) */
    float *present_k, *present_v;      /* (B, Nkv, Cp, H); past's own buffers when bound to both */
    const float *bias;                 /* (bias_b, bias_n, bias_rows, T), bias_b in {1, B}, bias_n in {1, N},
                                          bias_rows in {1, S} (1: every new token takes the same row); or NULL */
    float *out;                        /* (B, S, N H) */
    float *scratch;                    /* B Nkv T floats: one row of scores per unit */
    size_t batch, seq, heads, kv_heads, head_size, capacity, present_capacity, total, bias_b, bias_n, bias_rows;
    size_t window;                     /* a query sees keys less than `window` positions back; 0: all */
    int sliding;                       /* the cache holds the most recent rows only (capacity >= window) */
    float scale;
} EdgelmAttention;

/* Rows a sliding cache of `capacity` holds after `total` tokens (the runtime's kv.py and the export's
 * validation compute the same): total while it fits, else fewer by whole compactions of
 * capacity - window + 1 rows, each keeping the window - 1 most recent rows. */
EDGELM_EXPORT size_t edgelm_resident_rows(size_t total, size_t capacity, size_t window);

EDGELM_EXPORT void edgelm_attention_unit(const EdgelmAttention *a, size_t unit);

/* The LM head's screen (screen.c): an int8 copy of a packed weight with, per column, what bounds an
 * estimate's distance from the fp32 product, so that a greedy step computes in fp32 only the panels
 * that may hold the argmax. */
typedef struct {
    int8_t *q;                         /* [P][ceil(K / 2)][16][2]: rows 2i and 2i + 1 of a column side by side */
    float *scale, *err, *half, *round; /* per column (P * 16): scale, |W - D|_2, scale / 2, g (|W|_2 + |D|_2) */
    float *norm, *peak;                /* per column: |D|_2, max |D| */
    size_t k, n, panels;
    const float *source;               /* the panels it was built from */
} EdgelmScreen;

/* Builds the screen of packed panels w (K rows, n columns); 0, or -1 when memory runs out. In parts:
 * edgelm_screen_alloc, then edgelm_screen_fill for every range of panels (threads may take ranges). */
EDGELM_EXPORT int edgelm_screen_build(EdgelmScreen *s, const float *w, size_t k, size_t n);
EDGELM_EXPORT int edgelm_screen_alloc(EdgelmScreen *s, const float *w, size_t k, size_t n);
EDGELM_EXPORT void edgelm_screen_fill(EdgelmScreen *s, size_t p0, size_t p1);
EDGELM_EXPORT void edgelm_screen_free(EdgelmScreen *s);
/* x's m rows (of k) as int16 x16 (m rows of 2 ceil(k / 2), a last odd one 0) with a scale xs per row. */
EDGELM_EXPORT void edgelm_screen_quantize_x(const float *x, size_t m, size_t k, int16_t *x16, float *xs);
/* The estimates of panels [p0, p1) for the m rows of x (as x16, xs) into y (row stride n). */
EDGELM_EXPORT void edgelm_screen_estimate(const EdgelmScreen *s, const int16_t *x16, const float *xs, size_t m,
                                          const float *b, float *y, size_t p0, size_t p1);
/* For one row x (as x16, xs) and its estimates y: flags[p] = 1 for every panel that may hold its argmax
 * (0 for the others); returns how many. */
EDGELM_EXPORT size_t edgelm_screen_candidates(const EdgelmScreen *s, const float *x, const int16_t *x16, float xs,
                                              const float *b, const float *y, unsigned char *flags);

/* 2 = AVX-512, 1 = AVX2 + FMA, 0 = generic: the kernels this CPU runs (inside the library only). */
int edgelm_isa(void);

/* "avx512f", "avx2" or "generic": the kernel this CPU runs. */
EDGELM_EXPORT const char *edgelm_kernel_isa(void);

#endif
