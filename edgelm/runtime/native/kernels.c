/* The packed linear kernel and the read probe, for AVX-512, AVX2 and any other CPU (see kernels.h). */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

/* ---- portable kernel: plain C over the 16 lanes of a panel (the compiler vectorizes it) -------- */
static void panels_generic(const float *x, size_t m, size_t k, const float *w, const float *b,
                           float *y, size_t n, size_t p0, size_t p1) {
    for (size_t p = p0; p < p1; p++) {
        const float *wp = w + p * k * EDGELM_PANEL;
        size_t lanes = n - p * EDGELM_PANEL < EDGELM_PANEL ? n - p * EDGELM_PANEL : EDGELM_PANEL;
        for (size_t r = 0; r < m; r++) {
            float acc[EDGELM_PANEL] = {0};
            const float *xr = x + r * k;
            for (size_t i = 0; i < k; i++)
                for (int l = 0; l < EDGELM_PANEL; l++) acc[l] += wp[i * EDGELM_PANEL + l] * xr[i];
            for (size_t l = 0; l < lanes; l++) y[r * n + p * EDGELM_PANEL + l] = acc[l] + (b ? b[p * EDGELM_PANEL + l] : 0.0f);
        }
    }
}

static double read_generic(const float *x, size_t n) {
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[i + l];
    double s = 0;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += x[i];
    return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

/* ---- AVX-512: one zmm is one panel row ------------------------------------------------------- */
__attribute__((target("avx512f")))
static void panels_avx512(const float *x, size_t m, size_t k, const float *w, const float *b,
                          float *y, size_t n, size_t p0, size_t p1) {
    for (size_t p = p0; p < p1; p++) {
        const float *wp = w + p * k * EDGELM_PANEL;
        size_t col = p * EDGELM_PANEL;
        __mmask16 mask = n - col >= EDGELM_PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - col)) - 1);
        __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b + col) : _mm512_setzero_ps();
        size_t r = 0;
        if (m == 1) {  /* decode: four independent sums hide the FMA latency; the stream is the limit */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            size_t i = 0;
            for (; i + 4 <= k; i += 4) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + (i + 0) * 16), _mm512_set1_ps(x[i + 0]), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + (i + 1) * 16), _mm512_set1_ps(x[i + 1]), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + (i + 2) * 16), _mm512_set1_ps(x[i + 2]), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + (i + 3) * 16), _mm512_set1_ps(x[i + 3]), a3);
            }
            for (; i < k; i++) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + i * 16), _mm512_set1_ps(x[i]), a0);
            __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            _mm512_mask_storeu_ps(y + col, mask, _mm512_add_ps(s, bias));
            continue;
        }
        /* several rows: four at a time share each weight load (the panel stays in L2 between blocks) */
        for (; r + 4 <= m; r += 4) {
            const float *x0 = x + r * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (size_t i = 0; i < k; i++) {
                __m512 wv = _mm512_loadu_ps(wp + i * 16);
                a0 = _mm512_fmadd_ps(wv, _mm512_set1_ps(x0[i]), a0);
                a1 = _mm512_fmadd_ps(wv, _mm512_set1_ps(x1[i]), a1);
                a2 = _mm512_fmadd_ps(wv, _mm512_set1_ps(x2[i]), a2);
                a3 = _mm512_fmadd_ps(wv, _mm512_set1_ps(x3[i]), a3);
            }
            _mm512_mask_storeu_ps(y + (r + 0) * n + col, mask, _mm512_add_ps(a0, bias));
            _mm512_mask_storeu_ps(y + (r + 1) * n + col, mask, _mm512_add_ps(a1, bias));
            _mm512_mask_storeu_ps(y + (r + 2) * n + col, mask, _mm512_add_ps(a2, bias));
            _mm512_mask_storeu_ps(y + (r + 3) * n + col, mask, _mm512_add_ps(a3, bias));
        }
        for (; r < m; r++) {
            const float *xr = x + r * k;
            __m512 a0 = _mm512_setzero_ps();
            for (size_t i = 0; i < k; i++) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wp + i * 16), _mm512_set1_ps(xr[i]), a0);
            _mm512_mask_storeu_ps(y + r * n + col, mask, _mm512_add_ps(a0, bias));
        }
    }
}

__attribute__((target("avx512f")))
static double read_avx512(const float *x, size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + i + 48));
    }
    double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return s + read_generic(x + i, n - i);
}

/* ---- AVX2: a panel row is two ymm ------------------------------------------------------------ */
__attribute__((target("avx2,fma")))
static void panels_avx2(const float *x, size_t m, size_t k, const float *w, const float *b,
                        float *y, size_t n, size_t p0, size_t p1) {
    for (size_t p = p0; p < p1; p++) {
        const float *wp = w + p * k * EDGELM_PANEL;
        size_t col = p * EDGELM_PANEL;
        size_t lanes = n - col < EDGELM_PANEL ? n - col : EDGELM_PANEL;
        for (size_t r = 0; r < m; r++) {
            const float *xr = x + r * k;
            __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
            size_t i = 0;
            for (; i + 2 <= k; i += 2) {
                __m256 x0 = _mm256_set1_ps(xr[i]), x1 = _mm256_set1_ps(xr[i + 1]);
                lo0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16), x0, lo0);
                hi0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16 + 8), x0, hi0);
                lo1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16 + 16), x1, lo1);
                hi1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16 + 24), x1, hi1);
            }
            for (; i < k; i++) {
                __m256 x0 = _mm256_set1_ps(xr[i]);
                lo0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16), x0, lo0);
                hi0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + i * 16 + 8), x0, hi0);
            }
            float out[16];
            _mm256_storeu_ps(out, _mm256_add_ps(lo0, lo1));
            _mm256_storeu_ps(out + 8, _mm256_add_ps(hi0, hi1));
            for (size_t l = 0; l < lanes; l++) y[r * n + col + l] = out[l] + (b ? b[col + l] : 0.0f);
        }
    }
}
#endif

typedef void (*panels_fn)(const float *, size_t, size_t, const float *, const float *, float *, size_t, size_t, size_t);
typedef double (*read_fn)(const float *, size_t);

/* 2 = AVX-512, 1 = AVX2 + FMA, 0 = generic. EDGELM_KERNEL_ISA=avx2|generic picks a lesser kernel
 * (the tests run every kernel on one machine); it never picks one the CPU lacks. */
static int isa(void) {
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
    if (isa() == 2) { panels_avx512(x, m, k, w, b, y, n, p0, p1); return; }
    if (isa() == 1) { panels_avx2(x, m, k, w, b, y, n, p0, p1); return; }
#endif
    panels_generic(x, m, k, w, b, y, n, p0, p1);
}

double edgelm_read_sum(const float *x, size_t n) {
#ifdef HAVE_X86
    if (isa() == 2) return read_avx512(x, n);
#endif
    return read_generic(x, n);
}

const char *edgelm_kernel_isa(void) {
    static const char *names[] = {"generic", "avx2", "avx512f"};
    return names[isa()];
}
