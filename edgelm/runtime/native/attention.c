/* Attention over a KV cache appended in place: the kernel of ai.edgelm.CachedAttention (ops.c).
 *
 * One unit is one batch row and one KV head with the query heads that share it. For each query it
 * scores the keys it may see (causal; within `window` positions when there is one), adds the
 * attention bias, takes the softmax and sums the values. Cache layouts (kernels.h, EdgelmAttention):
 * - full cache: row j holds position j; the new tokens' keys and values go to rows [P, T) first
 *   (P = T - S tokens were there before), then every query reads its keys from the cache;
 * - sliding cache: rows [0, L(P)) hold the most recent positions; the queries read the old rows and
 *   the new tokens' own keys, and only then is the cache compacted and appended to, so no key a
 *   query needs is overwritten before it is read.
 * Three versions of the loops: AVX2 + FMA intrinsics (head sizes that are multiples of 8; AVX-512
 * CPUs run them too), 4-lane GCC/Clang vectors (multiples of 4: NEON on ARM, SSE on an x86 without
 * AVX2) and plain C for any other head size.
 */
#include <string.h>

#include "kernels.h"

#define LANES 16

size_t edgelm_resident_rows(size_t total, size_t capacity, size_t window) {
    if (total <= capacity) return total;
    size_t drop = capacity - window + 1;  /* rows one compaction drops */
    return total - drop * ((total - capacity + drop - 1) / drop);
}

/* The three loops of one query, per instruction set:
 *   scores: s[j] = scale * q . k_j (+ bias[j]) for n keys k_j = keys + j * stride (h floats each)
 *   expsum: s[j] = exp(s[j] - top) for j < n; returns the sum
 *   weigh:  o[0, h) += sum_j p[j] v_j for n rows v_j = values + j * stride */
typedef struct {
    void (*scores)(const float *q, const float *keys, size_t n, size_t h, size_t stride, float scale,
                   const float *bias, float *s);
    float (*expsum)(float *s, size_t n, float top);
    void (*weigh)(float *o, const float *p, const float *values, size_t n, size_t h, size_t stride);
} Loops;

static void scores_generic(const float *q, const float *keys, size_t n, size_t h, size_t stride, float scale,
                           const float *bias, float *s) {
    for (size_t j = 0; j < n; j++) {
        const float *k = keys + j * stride;
        float acc[LANES] = {0}, dot = 0.0f;
        size_t i = 0;
        for (; i + LANES <= h; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += q[i + l] * k[i + l];
        for (; i < h; i++) dot += q[i] * k[i];
        for (int l = 0; l < LANES; l++) dot += acc[l];
        s[j] = scale * dot + (bias ? bias[j] : 0.0f);
    }
}

static float expsum_generic(float *s, size_t n, float top) {
    float sum = 0.0f;
    for (size_t j = 0; j < n; j++) sum += (s[j] = edgelm_exp(s[j] - top));
    return sum;
}

static void weigh_generic(float *o, const float *p, const float *values, size_t n, size_t h, size_t stride) {
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < h; i++) o[i] += p[j] * values[j * stride + i];
}

static const Loops loops_generic = {scores_generic, expsum_generic, weigh_generic};

/* The same loops on 4-lane vectors (kernels.h) for head sizes that are a multiple of 4, as the AVX2
 * ones: one key (or value row) from each quarter of the rows at a time, four streams in flight. */
static void scores_v4(const float *q, const float *keys, size_t n, size_t h, size_t stride, float scale,
                      const float *bias, float *s) {
    const size_t quarter = n / 4, qs = quarter * stride;
    for (size_t j = 0; j < quarter; j++) {
        const float *k = keys + j * stride;
        edgelm_v4 a[4] = {{0}}, b[4] = {{0}};  /* two sums per key (even and odd 4-column chunks) halve the chains */
        size_t i = 0;
        for (; i + 8 <= h; i += 8) {
            edgelm_v4 qe = edgelm_load4(q + i), qo = edgelm_load4(q + i + 4);
            for (int r = 0; r < 4; r++) {
                a[r] += qe * edgelm_load4(k + r * qs + i);
                b[r] += qo * edgelm_load4(k + r * qs + i + 4);
            }
        }
        if (i < h) {  /* h = 4 (mod 8) */
            edgelm_v4 qe = edgelm_load4(q + i);
            for (int r = 0; r < 4; r++) a[r] += qe * edgelm_load4(k + r * qs + i);
        }
        for (int r = 0; r < 4; r++)
            s[j + r * quarter] = scale * edgelm_sum4(a[r] + b[r]) + (bias ? bias[j + r * quarter] : 0.0f);
    }
    if (4 * quarter < n)
        scores_generic(q, keys + 4 * quarter * stride, n - 4 * quarter, h, stride, scale,
                       bias ? bias + 4 * quarter : NULL, s + 4 * quarter);
}

static float expsum_v4(float *s, size_t n, float top) {
    edgelm_v4 sum = {0};
    size_t j = 0;
    for (; j + 4 <= n; j += 4) {
        edgelm_v4 e = edgelm_exp4(edgelm_load4(s + j) - top);
        edgelm_store4(s + j, e);
        sum += e;
    }
    return edgelm_sum4(sum) + (j < n ? expsum_generic(s + j, n - j, top) : 0.0f);
}

/* 32 columns of o in 8 vectors at a time, over blocks of rows that fit in 16 K bytes (four quarters'
 * rows), so a wide head's later column blocks read them from L1 */
static void weigh_v4(float *o, const float *p, const float *values, size_t n, size_t h, size_t stride) {
    const size_t quarter = n / 4, block = h <= 256 ? 1024 / h : 4;
    for (size_t j0 = 0; j0 < quarter; j0 += block) {
        const size_t j1 = j0 + block < quarter ? j0 + block : quarter;
        for (size_t c = 0; c < h; c += 32) {
            const int vecs = h - c >= 32 ? 8 : (int)((h - c) / 4);
            edgelm_v4 a[8];
            for (int u = 0; u < vecs; u++) a[u] = edgelm_load4(o + c + 4 * u);
            for (size_t j = j0; j < j1; j++)
                for (int r = 0; r < 4; r++) {
                    const float pj = p[j + r * quarter], *v = values + (j + r * quarter) * stride + c;
                    for (int u = 0; u < vecs; u++) a[u] += pj * edgelm_load4(v + 4 * u);
                }
            for (int u = 0; u < vecs; u++) edgelm_store4(o + c + 4 * u, a[u]);
        }
    }
    if (4 * quarter < n) weigh_generic(o, p + 4 * quarter, values + 4 * quarter * stride, n - 4 * quarter, h, stride);
}

static const Loops loops_v4 = {scores_v4, expsum_v4, weigh_v4};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
/* AVX2 + FMA (AVX-512 CPUs run these too: the loops are short and bound by loads). Head sizes that are
 * a multiple of 8 (every GPT-2 and GPT-Neo); others take the 4-lane or the plain loops above. */
#define AVX2 __attribute__((target("avx2,fma")))

/* Scores of 4 keys at a time, one from each quarter of the rows: four streams of keys in flight (one
 * stream at a time, a core drew about half of memory's bandwidth); 4 dot products in 4 ymm, summed
 * across lanes together (hadd). The rows past the quarters take the generic loop. */
AVX2 static void scores_avx2(const float *q, const float *keys, size_t n, size_t h, size_t stride, float scale,
                             const float *bias, float *s) {
    const size_t quarter = n / 4, qs = quarter * stride;
    for (size_t j = 0; j < quarter; j++) {
        const float *k = keys + j * stride;
        /* two sums per key (even and odd 8-column chunks) halve the FMA chains */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        size_t i = 0;
        for (; i + 16 <= h; i += 16) {
            __m256 qi = _mm256_loadu_ps(q + i), qo = _mm256_loadu_ps(q + i + 8);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + qs + i), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 2 * qs + i), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 3 * qs + i), a3);
            b0 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(k + i + 8), b0);
            b1 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(k + qs + i + 8), b1);
            b2 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(k + 2 * qs + i + 8), b2);
            b3 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(k + 3 * qs + i + 8), b3);
        }
        if (i < h) {  /* h = 8 (mod 16) */
            __m256 qi = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + qs + i), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 2 * qs + i), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 3 * qs + i), a3);
        }
        a0 = _mm256_add_ps(a0, b0), a1 = _mm256_add_ps(a1, b1), a2 = _mm256_add_ps(a2, b2), a3 = _mm256_add_ps(a3, b3);
        __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  /* (k0 k1 k2 k3) per 128-bit half */
        float dots[4];
        _mm_storeu_ps(dots, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), _mm_set1_ps(scale)));
        for (int r = 0; r < 4; r++) s[j + r * quarter] = dots[r] + (bias ? bias[j + r * quarter] : 0.0f);
    }
    if (4 * quarter < n)
        scores_generic(q, keys + 4 * quarter * stride, n - 4 * quarter, h, stride, scale,
                       bias ? bias + 4 * quarter : NULL, s + 4 * quarter);
}

/* exp(s - top), 8 lanes (edgelm_exp8, kernels.h) */
AVX2 static float expsum_avx2(float *s, size_t n, float top) {
    __m256 sum = _mm256_setzero_ps(), t = _mm256_set1_ps(top);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = edgelm_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half) + (j < n ? expsum_generic(s + j, n - j, top) : 0.0f);
}

/* o += sum_j p[j] v_j, one row from each quarter of the rows at a time (four streams in flight, as
 * in the scores): 64 columns held in 8 ymm, over blocks of 32 rows per quarter (a wider head's
 * column blocks then re-read rows still in L1, not memory). The rows past the quarters go last. */
#define ROWBLOCK 32
AVX2 static void weigh_avx2(float *o, const float *p, const float *values, size_t n, size_t h, size_t stride) {
    const size_t quarter = n / 4, qs = quarter * stride;
    for (size_t j0 = 0; j0 < quarter; j0 += ROWBLOCK) {
        const size_t j1 = j0 + ROWBLOCK < quarter ? j0 + ROWBLOCK : quarter;
        size_t c = 0;
        for (; c + 64 <= h; c += 64) {
            __m256 a[8];
            for (int u = 0; u < 8; u++) a[u] = _mm256_loadu_ps(o + c + 8 * u);
            for (size_t j = j0; j < j1; j++) {
                const float *v = values + j * stride + c;
                for (int r = 0; r < 4; r++) {
                    __m256 pj = _mm256_set1_ps(p[j + r * quarter]);
                    for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + r * qs + 8 * u), a[u]);
                }
            }
            for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + c + 8 * u, a[u]);
        }
        for (; c < h; c += 8) {
            __m256 a = _mm256_loadu_ps(o + c);
            for (size_t j = j0; j < j1; j++)
                for (int r = 0; r < 4; r++)
                    a = _mm256_fmadd_ps(_mm256_set1_ps(p[j + r * quarter]), _mm256_loadu_ps(values + j * stride + r * qs + c), a);
            _mm256_storeu_ps(o + c, a);
        }
    }
    for (size_t j = 4 * quarter; j < n; j++)
        for (size_t c = 0; c < h; c += 8)
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(values + j * stride + c),
                                                    _mm256_loadu_ps(o + c)));
}

static const Loops loops_avx2 = {scores_avx2, expsum_avx2, weigh_avx2};
#endif

static const Loops *pick_loops(size_t head_size) {
#ifdef HAVE_X86
    if (edgelm_isa() >= 1 && head_size % 8 == 0) return &loops_avx2;
#endif
    return head_size % 4 == 0 ? &loops_v4 : &loops_generic;
}

void edgelm_attention_unit(const EdgelmAttention *a, size_t unit) {
    const size_t b = unit / a->kv_heads, g = unit % a->kv_heads, h = a->head_size;
    const size_t S = a->seq, T = a->total, P = T - S, C = a->capacity;
    const size_t width = (a->heads + 2 * a->kv_heads) * h, group = a->heads / a->kv_heads;
    const float *past_k = a->past_k + (b * a->kv_heads + g) * C * h;
    const float *past_v = a->past_v + (b * a->kv_heads + g) * C * h;
    float *cache_k = a->present_k + (b * a->kv_heads + g) * a->present_capacity * h;
    float *cache_v = a->present_v + (b * a->kv_heads + g) * a->present_capacity * h;
    const float *new_qkv = a->qkv + b * S * width;
    const size_t k_at = a->heads * h + g * h, v_at = (a->heads + a->kv_heads) * h + g * h;
    const int aliased = a->present_k == a->past_k;
    float *s = a->scratch + unit * T;

    size_t old = P, old_pos = 0;  /* rows of the cache before this step, and the position of row 0 */
    if (a->sliding) {
        old = edgelm_resident_rows(P, C, a->window);
        old_pos = P - old;
    } else {  /* full cache: the new rows go in first, then the queries read everything from it */
        if (!aliased && P) {
            memcpy(cache_k, past_k, P * h * sizeof(float));
            memcpy(cache_v, past_v, P * h * sizeof(float));
        }
        for (size_t t = 0; t < S; t++) {
            memcpy(cache_k + (P + t) * h, new_qkv + t * width + k_at, h * sizeof(float));
            memcpy(cache_v + (P + t) * h, new_qkv + t * width + v_at, h * sizeof(float));
        }
    }
    const float *old_k = a->sliding ? (aliased ? cache_k : past_k) : cache_k;
    const float *old_v = a->sliding ? (aliased ? cache_v : past_v) : cache_v;

    const Loops *f = pick_loops(h);
    for (size_t r = 0; r < group; r++) {
        const size_t head = g * group + r;
        for (size_t i = 0; i < S; i++) {
            const size_t pos = P + i, first = a->window && pos + 1 > a->window ? pos + 1 - a->window : 0;
            const float *q = new_qkv + i * width + head * h, *bias = NULL;
            if (a->bias)
                bias = a->bias + (((a->bias_b > 1 ? b : 0) * a->bias_n + (a->bias_n > 1 ? head : 0)) * a->bias_rows
                                  + (a->bias_rows > 1 ? i : 0)) * T;
            /* keys at positions [first, pos]: rows [from, upto) of the cache (a sliding cache's old rows),
             * then, for a sliding cache, the new tokens' own keys [new_from, i] */
            const size_t from = first > old_pos ? first - old_pos : 0, upto = a->sliding ? old : pos + 1;
            const size_t n_old = from < upto ? upto - from : 0, new_from = first > P ? first - P : 0;
            const size_t n_new = a->sliding ? i + 1 - new_from : 0;
            f->scores(q, old_k + from * h, n_old, h, h, a->scale, bias ? bias + old_pos + from : NULL, s);
            f->scores(q, new_qkv + new_from * width + k_at, n_new, h, width, a->scale, bias ? bias + P + new_from : NULL, s + n_old);
            float top = s[0];
            for (size_t j = 1; j < n_old + n_new; j++) top = s[j] > top ? s[j] : top;
            const float inv = 1.0f / f->expsum(s, n_old + n_new, top);
            float *o = a->out + ((b * S + i) * a->heads + head) * h;
            memset(o, 0, h * sizeof(float));
            f->weigh(o, s, old_v + from * h, n_old, h, h);
            f->weigh(o, s + n_old, new_qkv + new_from * width + v_at, n_new, h, width);
            for (size_t e = 0; e < h; e++) o[e] *= inv;
        }
    }

    if (a->sliding) {  /* keep the most recent L(T) positions: the tail of the old rows, then the new */
        size_t rows = edgelm_resident_rows(T, C, a->window);
        size_t keep = rows > S ? rows - S : 0, skip = rows < S ? S - rows : 0;
        if (keep && (!aliased || old - keep)) {
            memmove(cache_k, old_k + (old - keep) * h, keep * h * sizeof(float));
            memmove(cache_v, old_v + (old - keep) * h, keep * h * sizeof(float));
        }
        for (size_t t = skip; t < S; t++) {
            memcpy(cache_k + (keep + t - skip) * h, new_qkv + t * width + k_at, h * sizeof(float));
            memcpy(cache_v + (keep + t - skip) * h, new_qkv + t * width + v_at, h * sizeof(float));
        }
    }
}
