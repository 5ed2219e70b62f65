/* The packed linear kernel and the read probe, for AVX-512, AVX2 and any other CPU (see kernels.h). */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Every kernel sums K in blocks of KBLOCK products and adds the block sums: a running sum over all
 * of K (2560 terms for GPT-Neo 2.7B) rounds worse than ONNX Runtime's MatMul, enough for a
 * 32-layer random-weight model to leave the export's validation tolerance. */
#define KBLOCK 256

/* ---- portable kernel: C with GCC/Clang vector types, four 4-lane vectors per panel row (NEON on
 * ARM, SSE on an x86 without AVX2; the accumulators stay in registers, as they do not in plain arrays) */
#define INLINE __attribute__((always_inline)) static inline
#define QUADS (EDGELM_PANEL / 4)

/* A decode's panels [p0, p1) in groups of 4, then the 1 to 3 left: fn(x, k, panels, b, y, n, column, q)
 * with q a constant at each call, so fn's loops over the group unroll. */
#define DECODE_PANELS(fn)                                                                              \
    do {                                                                                               \
        size_t p = p0;                                                                                 \
        for (; p + 4 <= p1; p += 4) fn(x, k, w + p * k * EDGELM_PANEL, b, y, n, p * EDGELM_PANEL, 4);  \
        switch (p1 - p) {                                                                              \
            case 3: fn(x, k, w + p * k * EDGELM_PANEL, b, y, n, p * EDGELM_PANEL, 3); break;           \
            case 2: fn(x, k, w + p * k * EDGELM_PANEL, b, y, n, p * EDGELM_PANEL, 2); break;           \
            case 1: fn(x, k, w + p * k * EDGELM_PANEL, b, y, n, p * EDGELM_PANEL, 1); break;           \
            default: break;                                                                            \
        }                                                                                              \
    } while (0)

/* One panel against m rows of x (a prompt, a batch) in blocks of 4 rows, then the 1 to 3 left:
 * fn(x rows, k, panel, b, lanes, y rows, n, rows, ahead) with rows and ahead constants at each call
 * (the loops unroll, the prefetch test leaves the loop); ahead: a batch of at most AHEAD_ROWS rows,
 * whose blocks also pull the next panel into L2 (AHEAD below). */
#define ROW_BLOCKS(fn)                                                                                 \
    do {                                                                                               \
        if (m <= AHEAD_ROWS) ROW_BLOCKS_WITH(fn, 1);                                                   \
        else ROW_BLOCKS_WITH(fn, 0);                                                                   \
    } while (0)
#define ROW_BLOCKS_WITH(fn, ahead)                                                                     \
    do {                                                                                               \
        size_t r = 0;                                                                                  \
        for (; r + 4 <= m; r += 4) fn(x + r * k, k, wp, b, lanes, y + r * n, n, 4, ahead);            \
        switch (m - r) {                                                                               \
            case 3: fn(x + r * k, k, wp, b, lanes, y + r * n, n, 3, ahead); break;                     \
            case 2: fn(x + r * k, k, wp, b, lanes, y + r * n, n, 2, ahead); break;                     \
            case 1: fn(x + r * k, k, wp, b, lanes, y + r * n, n, 1, ahead); break;                     \
            default: break;                                                                            \
        }                                                                                              \
    } while (0)

/* A batch of a few rows reads a panel slowly enough (4 rows: 8 FMAs per 64 bytes) that one stream
 * per thread leaves memory idle. So each block of rows over panel p also prefetches panel p + 1 (the
 * next K * 64 bytes, past the panel range too: a prefetch never faults), one line per k, into L2;
 * every block of the batch, not only the first (that drew more than the first block alone,
 * presumably by asking again for lines whose prefetch a full miss queue dropped). Up to AHEAD_ROWS rows: a longer prompt is bound
 * by its arithmetic, not by memory. benchmarks/kernel_speed.py against the build without it: 8 rows
 * 1.18x (AVX2) and 1.05x (generic), 1 and 32 rows unchanged (results/kernel_speed-batch-prefetch.md). */
#define AHEAD_ROWS 8
#define AHEAD(wp, k, i) __builtin_prefetch((wp) + ((k) + (i)) * EDGELM_PANEL, 0, 2)

/* Decode (one row) against `q` adjacent panels at once (at most 4; a constant at each call, so the
 * loops unroll): q streams of weights in flight, as in the AVX2 kernel. */
INLINE void decode_generic(const float *x, size_t k, const float *wp, const float *b, float *y, size_t n,
                           size_t col, int q) {
    float total[4][EDGELM_PANEL] = {{0}};
    const size_t stride = k * EDGELM_PANEL;
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        edgelm_v4 acc[4][QUADS] = {{{0}}};
        for (size_t i = i0; i < i1; i++)
            for (int j = 0; j < q; j++)
                for (int u = 0; u < QUADS; u++) acc[j][u] += edgelm_load4(wp + j * stride + i * EDGELM_PANEL + 4 * u) * x[i];
        for (int j = 0; j < q; j++)
            for (int u = 0; u < QUADS; u++)
                for (int l = 0; l < 4; l++) total[j][4 * u + l] += acc[j][u][l];
    }
    for (int j = 0; j < q; j++)
        for (size_t l = 0; l < EDGELM_PANEL && col + j * EDGELM_PANEL + l < n; l++)
            y[col + j * EDGELM_PANEL + l] = total[j][l] + (b ? b[col + j * EDGELM_PANEL + l] : 0.0f);
}

/* `rows` rows of x (at most 4; a constant at each call) against one panel: each weight serves every
 * row, so the panel is read from memory once per 4 rows, not once per row. */
INLINE void block_generic(const float *xr, size_t k, const float *wp, const float *b, size_t lanes, float *y,
                          size_t n, int rows, int ahead) {
    float total[4][EDGELM_PANEL];
    for (int j = 0; j < rows; j++)
        for (int l = 0; l < EDGELM_PANEL; l++) total[j][l] = b && (size_t)l < lanes ? b[l] : 0.0f;
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        edgelm_v4 acc[4][QUADS] = {{{0}}};
        for (size_t i = i0; i < i1; i++) {
            if (ahead) AHEAD(wp, k, i);
            edgelm_v4 w[QUADS];
            for (int u = 0; u < QUADS; u++) w[u] = edgelm_load4(wp + i * EDGELM_PANEL + 4 * u);
            for (int j = 0; j < rows; j++)
                for (int u = 0; u < QUADS; u++) acc[j][u] += w[u] * xr[j * k + i];
        }
        for (int j = 0; j < rows; j++)
            for (int u = 0; u < QUADS; u++)
                for (int l = 0; l < 4; l++) total[j][4 * u + l] += acc[j][u][l];
    }
    for (int j = 0; j < rows; j++)
        for (size_t l = 0; l < lanes; l++) y[j * n + l] = total[j][l];
}

/* One panel for m > 1 rows: blocks of 4 rows (ROW_BLOCKS), the panel read from memory once. */
static void rows_generic(const float *x, size_t m, size_t k, const float *wp, const float *b, size_t lanes,
                         float *y, size_t n) {
    ROW_BLOCKS(block_generic);
}

static void panels_generic(const float *x, size_t m, size_t k, const float *w, const float *b,
                           float *y, size_t n, size_t p0, size_t p1) {
    if (m == 1) {
        DECODE_PANELS(decode_generic);
        return;
    }
    for (size_t p = p0; p < p1; p++) {  /* a prompt or a batch */
        size_t col = p * EDGELM_PANEL, lanes = n - col < EDGELM_PANEL ? n - col : EDGELM_PANEL;
        rows_generic(x, m, k, w + p * k * EDGELM_PANEL, b ? b + col : NULL, lanes, y + col, n);
    }
}

/* GELU, tanh form (GPT-2's gelu_new, ONNX Runtime's FastGelu): 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
 * = v / (1 + exp(a)), a = -2 sqrt(2/pi) (v + 0.044715 v^3), exp by edgelm_exp (kernels.h). */
#define GELU_C -1.5957691216057308f
static inline float gelu_tanh(float v) {
    return v / (1.0f + edgelm_exp(GELU_C * (v + 0.044715f * v * v * v)));
}

void edgelm_skip_layer_norm(const float *x, const float *skip, const float *skip_bias, const float *gamma,
                            const float *beta, float eps, size_t m, size_t k, float *sum, float *out) {
    for (size_t r = 0; r < m; r++) {
        const float *xr = x + r * k, *sr = skip ? skip + r * k : NULL;
        float *h = sum ? sum + r * k : out + r * k, *o = out + r * k;
        double total = 0.0;
        for (size_t i = 0; i < k; i++) {
            float v = xr[i] + (sr ? sr[i] : 0.0f) + (skip_bias ? skip_bias[i] : 0.0f);
            h[i] = v;
            total += v;
        }
        double mean = total / (double)k, spread = 0.0;
        for (size_t i = 0; i < k; i++) spread += ((double)h[i] - mean) * ((double)h[i] - mean);
        float inv = (float)(1.0 / sqrt(spread / (double)k + (double)eps)), mu = (float)mean;
        for (size_t i = 0; i < k; i++) o[i] = (h[i] - mu) * inv * gamma[i] + (beta ? beta[i] : 0.0f);
    }
}

static void gelu_generic(float *y, size_t count) {  /* 4 lanes at a time, then one by one */
    size_t i = 0;
    for (; i + 4 <= count; i += 4) {
        edgelm_v4 v = edgelm_load4(y + i);
        edgelm_store4(y + i, v / (1.0f + edgelm_exp4(GELU_C * (v + 0.044715f * v * v * v))));
    }
    for (; i < count; i++) y[i] = gelu_tanh(y[i]);
}

/* The read probe reads its range as 4 quarters in lockstep: 4 streams in flight per thread, as the
 * linear kernels read 4 panels at once (one stream drew a quarter less from a core). */
#define STREAMS 4
static double read_generic(const float *x, size_t n) {
    size_t q = n / STREAMS / 16 * 16;
    float acc[16] = {0};
    for (size_t i = 0; i < q; i += 16)
        for (int st = 0; st < STREAMS; st++)
            for (int l = 0; l < 16; l++) acc[l] += x[st * q + i + l];
    double s = 0;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (size_t i = STREAMS * q; i < n; i++) s += x[i];
    return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

/* ---- AVX-512: one zmm is one panel row ------------------------------------------------------- */
/* `rows` rows of x (at most 8; a constant at each call, so the loops unroll) against one panel: each
 * weight load serves every row. */
__attribute__((target("avx512f"), always_inline))
static inline void block_avx512(const float *xr, size_t k, const float *wp, __m512 bias, __mmask16 mask,
                                float *y, size_t n, int rows, int ahead) {
    __m512 a[8], total[8];
    for (int j = 0; j < rows; j++) total[j] = bias;
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        for (int j = 0; j < rows; j++) a[j] = _mm512_setzero_ps();
        for (size_t i = i0; i < i1; i++) {
            if (ahead) AHEAD(wp, k, i);
            __m512 wv = _mm512_loadu_ps(wp + i * 16);
            for (int j = 0; j < rows; j++) a[j] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xr[j * k + i]), a[j]);
        }
        for (int j = 0; j < rows; j++) total[j] = _mm512_add_ps(total[j], a[j]);
    }
    for (int j = 0; j < rows; j++) _mm512_mask_storeu_ps(y + j * n, mask, total[j]);
}

/* One panel for m > 1 rows (a prompt, a batch): blocks of 8 rows, then 4, then 1. The panel (64 K
 * bytes) stays in L1/L2 from one block to the next, so memory is read once. A batch of at most
 * AHEAD_ROWS rows also pulls the next panel into L2, as the AVX2 blocks do (AHEAD above). */
#define BLOCKS_AVX512(ahead)                                                                           \
    do {                                                                                               \
        size_t r = 0;                                                                                  \
        for (; r + 8 <= m; r += 8) block_avx512(x + r * k, k, wp, bias, mask, y + r * n, n, 8, ahead); \
        for (; r + 4 <= m; r += 4) block_avx512(x + r * k, k, wp, bias, mask, y + r * n, n, 4, ahead); \
        for (; r < m; r++) block_avx512(x + r * k, k, wp, bias, mask, y + r * n, n, 1, ahead);         \
    } while (0)
__attribute__((target("avx512f")))
static void rows_avx512(const float *x, size_t m, size_t k, const float *wp, __m512 bias, __mmask16 mask,
                        float *y, size_t n) {
    if (m <= AHEAD_ROWS) BLOCKS_AVX512(1);
    else BLOCKS_AVX512(0);
}

/* Decode (one row) against `q` adjacent panels at once (at most 4; a constant at each call): q streams
 * of weights in flight per thread, as decode_avx2 below. One panel at a time drew 0.87x the read
 * probe's rate on an AVX-512 machine (Xeon with AMX, 2 cores), where the AVX2 kernel's 4 streams drew
 * 0.96x (benchmarks/step_breakdown.py, EDGELM_KERNEL_ISA=avx2). The same sums in the same order as
 * decode_avx2: one per lane and k in turn, block sums into the totals, the bias last. */
__attribute__((target("avx512f"), always_inline))
static inline void decode_avx512(const float *x, size_t k, const float *wp, const float *b, float *y, size_t n,
                                 size_t col, int q) {
    const size_t stride = k * EDGELM_PANEL;  /* floats from one panel to the next */
    __m512 total[4], a[4];
    for (int j = 0; j < q; j++) total[j] = _mm512_setzero_ps();
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        for (int j = 0; j < q; j++) a[j] = _mm512_setzero_ps();
        for (size_t i = i0; i < i1; i++) {
            __m512 xv = _mm512_set1_ps(x[i]);
            for (int j = 0; j < q; j++) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(wp + j * stride + i * 16), xv, a[j]);
        }
        for (int j = 0; j < q; j++) total[j] = _mm512_add_ps(total[j], a[j]);
    }
    for (int j = 0; j < q; j++) {
        size_t c = col + (size_t)j * EDGELM_PANEL;
        __mmask16 mask = n - c >= EDGELM_PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
        __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b + c) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(y + c, mask, _mm512_add_ps(total[j], bias));
    }
}

__attribute__((target("avx512f")))
static void panels_avx512(const float *x, size_t m, size_t k, const float *w, const float *b,
                          float *y, size_t n, size_t p0, size_t p1) {
    if (m == 1) {
        DECODE_PANELS(decode_avx512);
        return;
    }
    for (size_t p = p0; p < p1; p++) {  /* a prompt or a batch: see rows_avx512 */
        size_t col = p * EDGELM_PANEL;
        __mmask16 mask = n - col >= EDGELM_PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - col)) - 1);
        __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b + col) : _mm512_setzero_ps();
        rows_avx512(x, m, k, w + p * k * EDGELM_PANEL, bias, mask, y + col, n);
    }
}

/* gelu_tanh above, 16 lanes at a time */
__attribute__((target("avx512f")))
static void gelu_avx512(float *y, size_t count) {
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 mask = count - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(mask, y + i);
        __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        __m512 a = _mm512_mul_ps(_mm512_set1_ps(GELU_C), _mm512_fmadd_ps(cube, _mm512_set1_ps(0.044715f), v));
        a = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
        __m512 j = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(EDGELM_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(j, _mm512_set1_ps(EDGELM_LN2_HI), a);
        r = _mm512_fnmadd_ps(j, _mm512_set1_ps(EDGELM_LN2_LO), r);
        __m512 p = _mm512_set1_ps(1.0f / 5040);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(j), _mm512_set1_epi32(127)), 23));
        __m512 e = _mm512_fmadd_ps(p, scale, _mm512_set1_ps(1.0f));
        _mm512_mask_storeu_ps(y + i, mask, _mm512_div_ps(v, e));
    }
}

__attribute__((target("avx512f")))
static double read_avx512(const float *x, size_t n) {
    size_t q = n / STREAMS / 16 * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < q; i += 16) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + q + i));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + 2 * q + i));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + 3 * q + i));
    }
    double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (size_t i = STREAMS * q; i < n; i++) s += x[i];
    return s;
}

/* ---- AVX2: a panel row is two ymm ------------------------------------------------------------ */
/* `rows` rows of x (at most 6; a constant at each call) against one panel: each weight load serves
 * every row, 2 rows ymm of sums (12 at 6 rows, with 2 of weights and a broadcast: 15 of the 16
 * registers); the block sums are added into totals kept on the stack (L1). */
__attribute__((target("avx2,fma"), always_inline))
static inline void block_avx2(const float *xr, size_t k, const float *wp, const float *b, size_t lanes,
                              float *y, size_t n, int rows, int ahead) {
    float total[6][EDGELM_PANEL];
    for (int j = 0; j < rows; j++)
        for (int l = 0; l < EDGELM_PANEL; l++) total[j][l] = b && (size_t)l < lanes ? b[l] : 0.0f;
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        __m256 lo[6], hi[6];
        for (int j = 0; j < rows; j++) lo[j] = hi[j] = _mm256_setzero_ps();
        for (size_t i = i0; i < i1; i++) {
            if (ahead) AHEAD(wp, k, i);
            __m256 wl = _mm256_loadu_ps(wp + i * 16), wh = _mm256_loadu_ps(wp + i * 16 + 8);
            for (int j = 0; j < rows; j++) {
                __m256 xv = _mm256_set1_ps(xr[j * k + i]);
                lo[j] = _mm256_fmadd_ps(wl, xv, lo[j]);
                hi[j] = _mm256_fmadd_ps(wh, xv, hi[j]);
            }
        }
        for (int j = 0; j < rows; j++) {
            _mm256_storeu_ps(total[j], _mm256_add_ps(_mm256_loadu_ps(total[j]), lo[j]));
            _mm256_storeu_ps(total[j] + 8, _mm256_add_ps(_mm256_loadu_ps(total[j] + 8), hi[j]));
        }
    }
    for (int j = 0; j < rows; j++)
        for (size_t l = 0; l < lanes; l++) y[j * n + l] = total[j][l];
}

/* Blocks of rows over one panel for AVX2: 6 rows a block (an FMA's result is ready some 4-5 cycles
 * after it starts, two start a cycle: the 8 independent sums of 4 rows leave the FMA units idle part
 * of the time, the 12 of 6 rows do not), except that 7 and 8 rows go as 4 + the rest (two short
 * blocks take less time than 6 + 1 or 6 + 2). `ahead` a constant, as in ROW_BLOCKS. 32 rows: 1.08x
 * the 4-row blocks (benchmarks/kernel_speed.py, results/kernel_speed-six-rows.md). */
#define SIX_ROW_BLOCKS(ahead)                                                                          \
    do {                                                                                               \
        for (size_t r = 0; r < m;) {                                                                   \
            size_t left = m - r, take = left == 7 || left == 8 ? 4 : left < 6 ? left : 6;              \
            const float *xr = x + r * k;                                                               \
            float *yr = y + r * n;                                                                     \
            switch (take) {                                                                            \
                case 6: block_avx2(xr, k, wp, b, lanes, yr, n, 6, ahead); break;                       \
                case 5: block_avx2(xr, k, wp, b, lanes, yr, n, 5, ahead); break;                       \
                case 4: block_avx2(xr, k, wp, b, lanes, yr, n, 4, ahead); break;                       \
                case 3: block_avx2(xr, k, wp, b, lanes, yr, n, 3, ahead); break;                       \
                case 2: block_avx2(xr, k, wp, b, lanes, yr, n, 2, ahead); break;                       \
                default: block_avx2(xr, k, wp, b, lanes, yr, n, 1, ahead); break;                      \
            }                                                                                          \
            r += take;                                                                                 \
        }                                                                                              \
    } while (0)

/* One panel for m > 1 rows (a prompt, a batch): SIX_ROW_BLOCKS; the panel stays in L1/L2 from one
 * block to the next, so memory is read once. */
__attribute__((target("avx2,fma")))
static void rows_avx2(const float *x, size_t m, size_t k, const float *wp, const float *b, size_t lanes,
                      float *y, size_t n) {
    if (m <= AHEAD_ROWS) SIX_ROW_BLOCKS(1);
    else SIX_ROW_BLOCKS(0);
}

/* Decode (one row) against `q` adjacent panels at once (at most 4; a constant at each call): q
 * streams of weights in flight per thread instead of one, which one core needs to draw memory's
 * bandwidth (one panel at a time, a core read less than ONNX Runtime's NCHWc convolution drew from
 * it). 2q sums, one k at a time; block sums go to totals on the stack. */
__attribute__((target("avx2,fma"), always_inline))
static inline void decode_avx2(const float *x, size_t k, const float *wp, const float *b, float *y, size_t n,
                               size_t col, int q) {
    float total[4][EDGELM_PANEL] = {{0}};
    const size_t stride = k * EDGELM_PANEL;  /* floats from one panel to the next */
    for (size_t i0 = 0; i0 < k; i0 += KBLOCK) {
        size_t i1 = i0 + KBLOCK < k ? i0 + KBLOCK : k;
        __m256 lo[4], hi[4];
        for (int j = 0; j < q; j++) lo[j] = hi[j] = _mm256_setzero_ps();
        for (size_t i = i0; i < i1; i++) {
            __m256 xv = _mm256_set1_ps(x[i]);
            for (int j = 0; j < q; j++) {
                const float *row = wp + j * stride + i * 16;
                lo[j] = _mm256_fmadd_ps(_mm256_loadu_ps(row), xv, lo[j]);
                hi[j] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), xv, hi[j]);
            }
        }
        for (int j = 0; j < q; j++) {
            _mm256_storeu_ps(total[j], _mm256_add_ps(_mm256_loadu_ps(total[j]), lo[j]));
            _mm256_storeu_ps(total[j] + 8, _mm256_add_ps(_mm256_loadu_ps(total[j] + 8), hi[j]));
        }
    }
    for (int j = 0; j < q; j++)
        for (size_t l = 0; l < EDGELM_PANEL && col + j * EDGELM_PANEL + l < n; l++)
            y[col + j * EDGELM_PANEL + l] = total[j][l] + (b ? b[col + j * EDGELM_PANEL + l] : 0.0f);
}

__attribute__((target("avx2,fma")))
static void panels_avx2(const float *x, size_t m, size_t k, const float *w, const float *b,
                        float *y, size_t n, size_t p0, size_t p1) {
    if (m == 1) {
        DECODE_PANELS(decode_avx2);
        return;
    }
    for (size_t p = p0; p < p1; p++) {  /* a prompt or a batch */
        size_t col = p * EDGELM_PANEL;
        size_t lanes = n - col < EDGELM_PANEL ? n - col : EDGELM_PANEL;
        rows_avx2(x, m, k, w + p * k * EDGELM_PANEL, b ? b + col : NULL, lanes, y + col, n);
    }
}

/* gelu_tanh above, 8 lanes at a time */
__attribute__((target("avx2,fma")))
static void gelu_avx2(float *y, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 v = _mm256_loadu_ps(y + i);
        __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
        __m256 a = _mm256_mul_ps(_mm256_set1_ps(GELU_C), _mm256_fmadd_ps(cube, _mm256_set1_ps(0.044715f), v));
        _mm256_storeu_ps(y + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), edgelm_exp8(a))));
    }
    gelu_generic(y + i, count - i);
}

/* The read probe with 256-bit loads */
__attribute__((target("avx2")))
static double read_avx2(const float *x, size_t n) {
    size_t q = n / STREAMS / 16 * 16;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < q; i += 16) {
        a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i + 8)));
        a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_loadu_ps(x + q + i), _mm256_loadu_ps(x + q + i + 8)));
        a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_loadu_ps(x + 2 * q + i), _mm256_loadu_ps(x + 2 * q + i + 8)));
        a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_loadu_ps(x + 3 * q + i), _mm256_loadu_ps(x + 3 * q + i + 8)));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    double s = 0;
    for (int l = 0; l < 8; l++) s += lanes[l];
    for (size_t i = STREAMS * q; i < n; i++) s += x[i];
    return s;
}
#endif

typedef void (*panels_fn)(const float *, size_t, size_t, const float *, const float *, float *, size_t, size_t, size_t);
typedef double (*read_fn)(const float *, size_t);

/* 2 = AVX-512, 1 = AVX2 + FMA, 0 = generic. EDGELM_KERNEL_ISA=avx2|generic picks a lesser kernel
 * (the tests run every kernel on one machine); it never picks one the CPU lacks. */
int edgelm_isa(void) {
#ifdef HAVE_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
        const char *want = getenv("EDGELM_KERNEL_ISA");
        if (want && strcmp(want, "avx2") == 0 && cached > 1) cached = 1;
        if (want && strcmp(want, "generic") == 0) cached = 0;
    }
    return cached;
#else
    return 0;
#endif
}

void edgelm_linear_panels(const float *x, size_t m, size_t k, const float *w, const float *b,
                          float *y, size_t n, size_t p0, size_t p1) {
#ifdef HAVE_X86
    if (edgelm_isa() == 2) { panels_avx512(x, m, k, w, b, y, n, p0, p1); return; }
    if (edgelm_isa() == 1) { panels_avx2(x, m, k, w, b, y, n, p0, p1); return; }
#endif
    panels_generic(x, m, k, w, b, y, n, p0, p1);
}

void edgelm_gelu_tanh(float *y, size_t count) {
#ifdef HAVE_X86
    if (edgelm_isa() == 2) { gelu_avx512(y, count); return; }
    if (edgelm_isa() == 1) { gelu_avx2(y, count); return; }
#endif
    gelu_generic(y, count);
}

double edgelm_read_sum(const float *x, size_t n) {
#ifdef HAVE_X86
    if (edgelm_isa() == 2) return read_avx512(x, n);
    if (edgelm_isa() == 1) return read_avx2(x, n);
#endif
    return read_generic(x, n);
}

double edgelm_read_chunks(const float *x, size_t n, size_t chunk, size_t first, size_t step) {
    double s = 0;
    if (chunk == 0 || step == 0) return s;
    for (size_t c = first; c * chunk < n; c += step)
        s += edgelm_read_sum(x + c * chunk, n - c * chunk < chunk ? n - c * chunk : chunk);
    return s;
}

void edgelm_pack_panels(const float *src, size_t k, size_t n, size_t sk, size_t sj, float *dst,
                        size_t p0, size_t p1) {
    enum { ROWS = 64 };  /* rows per block: the block's 64 output lines stay in L1 across its 16 columns */
    for (size_t p = p0; p < p1; p++) {
        size_t j0 = p * EDGELM_PANEL, lanes = n - j0 < EDGELM_PANEL ? n - j0 : EDGELM_PANEL;
        float *out = dst + p * k * EDGELM_PANEL;
        if (sj == 1) {  /* W's rows are contiguous: each panel row is one short copy */
            for (size_t r = 0; r < k; r++) {
                memcpy(out + r * EDGELM_PANEL, src + r * sk + j0, lanes * sizeof(float));
                memset(out + r * EDGELM_PANEL + lanes, 0, (EDGELM_PANEL - lanes) * sizeof(float));
            }
            continue;
        }
        for (size_t r0 = 0; r0 < k; r0 += ROWS) {  /* W's columns are contiguous: read 16 of them along */
            size_t r1 = k - r0 < ROWS ? k : r0 + ROWS;
            for (size_t l = 0; l < EDGELM_PANEL; l++) {
                const float *col = src + (j0 + l) * sj;
                for (size_t r = r0; r < r1; r++)
                    out[r * EDGELM_PANEL + l] = l < lanes ? col[r * sk] : 0.0f;
            }
        }
    }
}

const char *edgelm_kernel_isa(void) {
    static const char *names[] = {"generic", "avx2", "avx512f"};
    return names[edgelm_isa()];
}
