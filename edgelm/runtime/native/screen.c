/* Screened logits: the LM head's exact argmax while reading a quarter of its bytes.
 *
 * A greedy decode step needs only the argmax of the logits y = x W (+ b), yet W, the vocabulary by
 * the hidden size, is the largest weight of a small model (154 MB of GPT-2 124M's 497 MB in fp32).
 * An int8 copy Q of W, one scale per column, gives every column j an estimate s_j = scale_j (x . Q_j)
 * (+ b_j) with a proven bound on its distance from the fp32 result:
 *
 *   |y_j - s_j| <= e_j = min(|W_j - D_j|_2 |x|_2, (scale_j / 2) |x|_1) + min(|D_j|_2 |x - x'|_2, max|D_j| |x - x'|_1)
 *                        + g (|W_j|_2 + |D_j|_2) |x|_2 + r_j
 *
 * with D_j = scale_j Q_j (Cauchy-Schwarz, or each weight within half a step of its rounding), x' the
 * row of x in int16 (one scale per row: the estimate is an exact integer sum, two int8 x int16
 * products per vpmaddwd), g the float32 rounding of a dot product of K terms (2 K 2^-24, the textbook
 * bound, for the fp32 result) and r_j that of the scales and the bias. Every column whose s_j + e_j falls below max_i (s_i - e_i) is below the
 * exact value of that column i, so it cannot be the argmax: only the panels of the other columns
 * (the candidates, a few per step on GPT-2 shapes, trained or random) are computed in fp32, by the
 * same kernel that computes them in the full product, so their values are bit for bit the same. The
 * argmax of the result (estimates elsewhere) is the argmax of the full product, ties included (every
 * estimate is strictly below the best exact value).
 *
 * The estimates are not the logits: ops.c uses this only when the caller says it needs the argmax
 * alone (greedy decoding without a repetition penalty); sampling takes the full product.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* Q, [P][K2][16][2] int8 (K2 = ceil(K / 2): the two rows 2i and 2i + 1 of a column side by side, as
 * vpmaddwd takes them; a last odd row pairs with a zero), and per column its scale, |W - D|_2, scale / 2,
 * the rounding term, |D|_2 and max |D|; columns past n (the last panel's padding) are zero everywhere. */
int edgelm_screen_alloc(EdgelmScreen *s, const float *w, size_t k, size_t n) {
    const size_t panels = (n + EDGELM_PANEL - 1) / EDGELM_PANEL, cols = panels * EDGELM_PANEL, k2 = (k + 1) / 2;
    memset(s, 0, sizeof *s);
    s->q = (int8_t *)calloc(panels * k2 * EDGELM_PANEL * 2, 1);
    float **per_column[] = {&s->scale, &s->err, &s->half, &s->round, &s->norm, &s->peak};
    int ok = s->q != NULL;
    for (size_t i = 0; i < sizeof per_column / sizeof *per_column; i++)
        ok = (*per_column[i] = (float *)calloc(cols, sizeof(float))) != NULL && ok;
    if (!ok) {
        edgelm_screen_free(s);
        return -1;
    }
    s->k = k, s->n = n, s->panels = panels, s->source = w;
    return 0;
}

void edgelm_screen_fill(EdgelmScreen *s, size_t p0, size_t p1) {
    const size_t k = s->k, k2 = (k + 1) / 2;
    const double g = 2.0 * (double)k * ldexp(1.0, -24);
    for (size_t p = p0; p < p1; p++) {
        const float *wp = s->source + p * k * EDGELM_PANEL;
        int8_t *qp = s->q + p * k2 * EDGELM_PANEL * 2;
        float absmax[EDGELM_PANEL] = {0};
        for (size_t i = 0; i < k; i++)
            for (int l = 0; l < EDGELM_PANEL; l++) {
                float a = fabsf(wp[i * EDGELM_PANEL + l]);
                absmax[l] = a > absmax[l] ? a : absmax[l];
            }
        float scale[EDGELM_PANEL], inv[EDGELM_PANEL];
        for (int l = 0; l < EDGELM_PANEL; l++) {
            scale[l] = absmax[l] / 127.0f;
            inv[l] = scale[l] > 0 ? 1.0f / scale[l] : 0.0f;
        }
        /* the sums of a panel row's squares in float, added to doubles once per row of 16 */
        double err2[EDGELM_PANEL] = {0}, w2[EDGELM_PANEL] = {0}, d2[EDGELM_PANEL] = {0};
        for (size_t i = 0; i < k; i++) {
            float e_row[EDGELM_PANEL], w_row[EDGELM_PANEL], d_row[EDGELM_PANEL];
            for (int l = 0; l < EDGELM_PANEL; l++) {
                float v = wp[i * EDGELM_PANEL + l];
                float r = nearbyintf(v * inv[l]);
                r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                qp[(i / 2) * EDGELM_PANEL * 2 + l * 2 + i % 2] = (int8_t)r;
                float d = r * scale[l];
                e_row[l] = v - d, w_row[l] = v, d_row[l] = d;
            }
            for (int l = 0; l < EDGELM_PANEL; l++) {
                err2[l] += (double)e_row[l] * e_row[l], w2[l] += (double)w_row[l] * w_row[l];
                d2[l] += (double)d_row[l] * d_row[l];
            }
        }
        for (int l = 0; l < EDGELM_PANEL; l++) {
            size_t j = p * EDGELM_PANEL + l;
            s->scale[j] = scale[l];
            /* v - d and d in float are within a float step of |v| of their exact values (|d| <= 128
             * scale): 1e-5 relative and 1e-6 scale sqrt(K) absolute cover them in the norms */
            s->err[j] = (float)(sqrt(err2[l]) * (1 + 1e-5) + 1e-6 * scale[l] * sqrt((double)k) * 128);
            /* |v - r scale| <= scale / 2 once v / scale is rounded to nearest; the float reciprocal and
             * products move it by a few float steps of |v| <= 127 scale: 0.5001 covers them */
            s->half[j] = scale[l] * 0.5001f;
            s->round[j] = (float)(g * (sqrt(w2[l]) + sqrt(d2[l])) * (1 + 1e-5));
            s->norm[j] = (float)(sqrt(d2[l]) * (1 + 1e-5));
            s->peak[j] = absmax[l] * 1.0001f;
        }
    }
}

int edgelm_screen_build(EdgelmScreen *s, const float *w, size_t k, size_t n) {
    if (edgelm_screen_alloc(s, w, k, n) != 0) return -1;
    edgelm_screen_fill(s, 0, s->panels);
    return 0;
}

void edgelm_screen_free(EdgelmScreen *s) {
    free(s->q), free(s->scale), free(s->err), free(s->half), free(s->round), free(s->norm), free(s->peak);
    memset(s, 0, sizeof *s);
}

/* x's rows as int16, xs[r] x16[r, i] ~ x[r, i], in pairs (one int32 per two features, as vpmaddwd
 * takes them); the largest magnitude is at most `limit`, so the int32 sums of Q x16 cannot overflow. */
static int16_t x_limit(size_t k) {
    double limit = 2147483647.0 / (127.0 * (double)(k + 1)) - 1;
    return (int16_t)(limit > 32767 ? 32767 : limit);
}

void edgelm_screen_quantize_x(const float *x, size_t m, size_t k, int16_t *x16, float *xs) {
    const size_t k2 = (k + 1) / 2;
    const float limit = (float)x_limit(k);
    for (size_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float peak = 0;
        for (size_t i = 0; i < k; i++) peak = fabsf(xr[i]) > peak ? fabsf(xr[i]) : peak;
        xs[r] = peak > 0 ? peak / limit : 1.0f;
        int16_t *out = x16 + r * k2 * 2;
        for (size_t i = 0; i < k2 * 2; i++) {
            float v = i < k ? nearbyintf(xr[i] / xs[r]) : 0.0f;
            v = v > limit ? limit : (v < -limit ? -limit : v);
            out[i] = (int16_t)v;
        }
    }
}

/* ---- the estimates: y[r, j] = scale_j xs_r (Q_j . x16_r) + b_j for the panels [p0, p1) ---------- */
static void estimate_generic(const EdgelmScreen *s, const int16_t *x16, const float *xs, size_t m, const float *b,
                             float *y, size_t p0, size_t p1) {
    const size_t k2 = (s->k + 1) / 2, n = s->n;
    for (size_t p = p0; p < p1; p++) {
        const int8_t *qp = s->q + p * k2 * EDGELM_PANEL * 2;
        for (size_t r = 0; r < m; r++) {
            int32_t acc[EDGELM_PANEL] = {0};
            const int16_t *xr = x16 + r * k2 * 2;
            for (size_t i = 0; i < k2; i++)
                for (int l = 0; l < EDGELM_PANEL; l++)
                    acc[l] += qp[i * 32 + 2 * l] * xr[2 * i] + qp[i * 32 + 2 * l + 1] * xr[2 * i + 1];
            for (int l = 0; l < EDGELM_PANEL && p * EDGELM_PANEL + l < n; l++) {
                size_t j = p * EDGELM_PANEL + l;
                y[r * n + j] = (float)acc[l] * (s->scale[j] * xs[r]) + (b ? b[j] : 0.0f);
            }
        }
    }
}

#ifdef HAVE_X86
static int has_avx512bw(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = edgelm_isa() == 2 && __builtin_cpu_supports("avx512bw");
    }
    return cached;
}

/* One zmm of 32 int16 per pair of panel rows (16 columns x 2 rows), vpmaddwd against the pair of x;
 * up to 4 rows of x share each widened pair; two accumulators at one row (a decode). */
__attribute__((target("avx512f,avx512bw")))
static void estimate_avx512(const EdgelmScreen *s, const int16_t *x16, const float *xs, size_t m, const float *b,
                            float *y, size_t p0, size_t p1) {
    const size_t k2 = (s->k + 1) / 2, n = s->n;
    for (size_t p = p0; p < p1; p++) {
        const int8_t *qp = s->q + p * k2 * EDGELM_PANEL * 2;
        const size_t col = p * EDGELM_PANEL, lanes = n - col < EDGELM_PANEL ? n - col : EDGELM_PANEL;
        const __mmask16 mask = (__mmask16)((1u << lanes) - 1);
        const __m512 scale = _mm512_loadu_ps(s->scale + col);
        const __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b + col) : _mm512_setzero_ps();
#define Q(i) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qp + (i) * 32)))
#define X(r, i) _mm512_set1_epi32(((const int32_t *)(x16 + (r) * k2 * 2))[i])
        for (size_t r0 = 0; r0 < m; r0 += 4) {
            const size_t rows = m - r0 < 4 ? m - r0 : 4;
            __m512i acc[4][2];
            for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
            size_t i = 0;
            if (rows == 1) {
                for (; i + 2 <= k2; i += 2) {
                    acc[0][0] = _mm512_add_epi32(acc[0][0], _mm512_madd_epi16(Q(i), X(r0, i)));
                    acc[0][1] = _mm512_add_epi32(acc[0][1], _mm512_madd_epi16(Q(i + 1), X(r0, i + 1)));
                }
            }
            for (; i < k2; i++) {
                const __m512i q = Q(i);
                for (size_t r = 0; r < rows; r++) acc[r][0] = _mm512_add_epi32(acc[r][0], _mm512_madd_epi16(q, X(r0 + r, i)));
            }
            for (size_t r = 0; r < rows; r++) {
                const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][0], acc[r][1]));
                _mm512_mask_storeu_ps(y + (r0 + r) * n + col, mask,
                                      _mm512_fmadd_ps(sum, _mm512_mul_ps(scale, _mm512_set1_ps(xs[r0 + r])), bias));
            }
        }
#undef Q
#undef X
    }
}

/* Two ymm of 16 int16 per pair of panel rows (columns 0-7, then 8-15). */
__attribute__((target("avx2,fma")))
static void estimate_avx2(const EdgelmScreen *s, const int16_t *x16, const float *xs, size_t m, const float *b,
                          float *y, size_t p0, size_t p1) {
    const size_t k2 = (s->k + 1) / 2, n = s->n;
    for (size_t p = p0; p < p1; p++) {
        const int8_t *qp = s->q + p * k2 * EDGELM_PANEL * 2;
        const size_t col = p * EDGELM_PANEL, lanes = n - col < EDGELM_PANEL ? n - col : EDGELM_PANEL;
#define QLO(i) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qp + (i) * 32)))
#define QHI(i) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qp + (i) * 32 + 16)))
        for (size_t r0 = 0; r0 < m; r0 += 2) {
            const size_t rows = m - r0 < 2 ? m - r0 : 2;
            __m256i lo[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            __m256i hi[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (size_t i = 0; i < k2; i++) {
                const __m256i ql = QLO(i), qh = QHI(i);
                for (size_t r = 0; r < rows; r++) {
                    const __m256i xv = _mm256_set1_epi32(((const int32_t *)(x16 + (r0 + r) * k2 * 2))[i]);
                    lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(ql, xv));
                    hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(qh, xv));
                }
            }
            for (size_t r = 0; r < rows; r++) {
                int32_t out[EDGELM_PANEL];
                _mm256_storeu_si256((__m256i *)out, lo[r]);
                _mm256_storeu_si256((__m256i *)(out + 8), hi[r]);
                for (size_t l = 0; l < lanes; l++)
                    y[(r0 + r) * n + col + l] = (float)out[l] * (s->scale[col + l] * xs[r0 + r]) + (b ? b[col + l] : 0.0f);
            }
        }
#undef QLO
#undef QHI
    }
}
#endif

void edgelm_screen_estimate(const EdgelmScreen *s, const int16_t *x16, const float *xs, size_t m, const float *b,
                            float *y, size_t p0, size_t p1) {
#ifdef HAVE_X86
    if (has_avx512bw()) { estimate_avx512(s, x16, xs, m, b, y, p0, p1); return; }
    if (edgelm_isa() >= 1) { estimate_avx2(s, x16, xs, m, b, y, p0, p1); return; }
#endif
    estimate_generic(s, x16, xs, m, b, y, p0, p1);
}

/* The bound of column j's estimate for a row with |x|_2 = a, |x|_1 = c, and |x - xs x16|_2 = f, _1 = g,
 * summed in float, each term a product of two floats: 1 + 1e-5 covers their rounding, and
 * 6e-7 (|y| + |b|), ten float steps of the values, that of the estimate's scales, the bias and the
 * comparisons. */
static inline float bound(const EdgelmScreen *s, size_t j, float a, float c, float f, float g, float yj, float bj) {
    float u = s->err[j] * a, v = s->half[j] * c, p = s->norm[j] * f, q = s->peak[j] * g;
    return ((u < v ? u : v) + (p < q ? p : q) + s->round[j] * a) * (1 + 1e-5f) + 6e-7f * (fabsf(yj) + fabsf(bj));
}

/* Marks (flags[p] = 1, the others 0) every panel holding a column that may be the argmax of the row
 * y (the estimates of the row x, from x16 and xs); returns how many panels it marked. */
size_t edgelm_screen_candidates(const EdgelmScreen *s, const float *x, const int16_t *x16, float xs, const float *b,
                                const float *y, unsigned char *flags) {
    const size_t k = s->k, n = s->n;
    memset(flags, 0, s->panels);
    double l1 = 0, l2 = 0, d1 = 0, d2 = 0;  /* |x|_1, |x|_2, and of x - xs x16 */
    for (size_t i = 0; i < k; i++) {
        double v = x[i], d = v - (double)xs * x16[i];
        l1 += fabs(v), l2 += v * v, d1 += fabs(d), d2 += d * d;
    }
    const float a = (float)(sqrt(l2) * (1 + 1e-6)), c = (float)(l1 * (1 + 1e-6));
    const float f = (float)(sqrt(d2) * (1 + 1e-6)), g = (float)(d1 * (1 + 1e-6));
    float *e = (float *)malloc(n * sizeof(float));
    if (!e) {  /* no room for the bounds: every panel is a candidate (the full product) */
        memset(flags, 1, s->panels);
        return s->panels;
    }
    float best = -INFINITY;  /* the best lower bound; then every column whose upper bound reaches it */
    for (size_t j = 0; j < n; j++) {
        e[j] = bound(s, j, a, c, f, g, y[j], b ? b[j] : 0.0f);
        float low = y[j] - e[j];
        best = low > best ? low : best;
    }
    size_t marked = 0;
    for (size_t j = 0; j < n; j++)
        if (!flags[j / EDGELM_PANEL] && y[j] + e[j] >= best) {
            flags[j / EDGELM_PANEL] = 1;
            marked++;
        }
    free(e);
    return marked;
}
