/* edgelm's ONNX Runtime operator library: ai.edgelm.PackedLinear, ai.edgelm.PackedEmbedding and
 * ai.edgelm.CachedAttention on the CPU provider.
 *
 *   Y, H? = PackedLinear(X, W, B?, Skip?, Gamma?, Beta?, SkipBias?, Screen?)
 *     attributes: n, the number of output columns; activation (optional): 0 none (default), 1 GELU's
 *     tanh form (FastGelu); epsilon (the LayerNorm's, default 1e-5)
 *   X: float (..., K)   W: float (ceil(n / 16), K, 16), 16-column panels (kernels.h)   B: float (n)
 *   Y: float (..., n) = activation(X W + B)
 *   With Gamma (K) the operator first applies the residual stream's LayerNorm, as ONNX Runtime's
 *   SkipLayerNormalization: H = X + Skip (..., K) + SkipBias (K), X' = LayerNorm(H) * Gamma + Beta, and
 *   Y = activation(X' W + B); H, the new residual stream, is the optional second output.
 *   Screen: int64 scalar; nonzero (no activation) asks for the argmax of each row of Y only: Y then holds
 *   the exact values of the panels that may hold it and estimates elsewhere, each below the row's
 *   largest exact value (screen.c), so the argmax of Y is the full product's, for a quarter of the
 *   reads of W. The runtime asks for it on an LM head when every row decodes greedily.
 *
 *   Y = PackedEmbedding(ids, W)
 *     attribute: n, the rows of the table (the vocabulary)
 *   ids: int64 (...), each in [0, n)   W: float (ceil(n / 16), D, 16), the table's transpose (D, n) packed as
 *   PackedLinear's W (a tied LM head and the lookup share it)   Y: float (..., D), row ids[i] of the table
 *
 *   Y, present_key, present_value = CachedAttention(QKV, past_key, past_value, seqlens_k?, total_sequence_length?,
 *                                                   attention_bias?, attention_mask?)
 *     attributes as com.microsoft.GroupQueryAttention's: num_heads N, kv_num_heads Nkv (default N), scale
 *     (default 1/sqrt(H)), local_window_size (keys less than this many positions back; -1: all),
 *     sliding_window_cache (1: a cache of capacity C >= window that keeps the most recent rows)
 *   QKV: float (B, S, (N + 2 Nkv) H), queries then keys then values of the S new tokens
 *   past_key, past_value: float (B, Nkv, C, H); seqlens_k: int32 (B), each T - 1; total_sequence_length:
 *   int32 scalar T; attention_bias: float (B or 1, N or 1, S, T), added to the scores by absolute position.
 *   Or, in place of all three, attention_mask: int64 (B, T), 0 for a padded position: T is its width, and
 *   a padded key's score gets MASKED_SCORE (what the matmul graph's bias adds: -1e9 in fp32).
 *   Y: float (B, S, N H); present_key, present_value: (B, Nkv, C', H), C' = C for a sliding cache, else
 *   max(C, T). Bound to the same buffers as the pasts (IO binding), the operator appends in place: a full
 *   cache gets rows [T - S, T); a sliding cache keeps the most recent edgelm_resident_rows(T) positions at
 *   rows [0, L(T)) (kernels.h). The same contract as GroupQueryAttention's in edgelm's graphs, which
 *   optimize.onnx_edit.packed_to_matmul turns this operator back into.
 *
 * ONNX Runtime loads the library with SessionOptions.register_custom_ops_library (it calls
 * RegisterCustomOps below); the panels of each call are split over ONNX Runtime's own intra-op
 * thread pool (KernelContext_ParallelFor), so no thread of ours competes with it.
 */
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "ort_abi.h"

#define API_VERSION 17 /* the oldest API with KernelContext_ParallelFor */
#define MAX_RANK 8

static const OrtApi *g_api;

enum { ACTIVATION_NONE = 0, ACTIVATION_GELU_TANH = 1 };
#define MASKED_SCORE (-1.0e9f) /* edgelm.export.builder.MASK_VALUE */

typedef struct {
    int64_t n;          /* output columns */
    int64_t activation; /* ACTIVATION_* */
    size_t chunks;      /* contiguous panel ranges handed to the thread pool per call */
    float epsilon;      /* the LayerNorm's, with Gamma */
    EdgelmScreen screen; /* built at the first screened call (screen.q NULL before) */
    atomic_flag building;
} PackedLinearKernel;

typedef struct {
    const float *x, *w, *b;
    float *y;
    size_t m, k, n, panels, chunks;
    int64_t activation;
    EdgelmScreen *screen;       /* estimates instead of the product, from x16 and xs (or, with fill, its making) */
    int fill;
    const int16_t *x16;
    const float *xs;
} Job;

static OrtStatus *fail(int code, const char *fmt, ...) {
    char msg[256];
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
    return ORT_FN(g_api, CreateStatus)(code, msg);
}

static void run_chunk(void *data, size_t chunk) {
    const Job *j = (const Job *)data;
    size_t p0 = j->panels * chunk / j->chunks, p1 = j->panels * (chunk + 1) / j->chunks;
    if (j->screen && j->fill) {
        edgelm_screen_fill(j->screen, p0, p1);
        return;
    }
    if (j->screen) {
        edgelm_screen_estimate(j->screen, j->x16, j->xs, j->m, j->b, j->y, p0, p1);
        return;
    }
    edgelm_linear_panels(j->x, j->m, j->k, j->w, j->b, j->y, j->n, p0, p1);
    if (j->activation == ACTIVATION_GELU_TANH) {  /* on the columns just written, still in cache */
        size_t c0 = p0 * EDGELM_PANEL, c1 = p1 * EDGELM_PANEL < j->n ? p1 * EDGELM_PANEL : j->n;
        for (size_t r = 0; r < j->m; r++) edgelm_gelu_tanh(j->y + r * j->n + c0, c1 - c0);
    }
}

/* Shape of input `index` into dims (at most MAX_RANK); *rank = -1 when the input is absent. */
static OrtStatus *input(OrtKernelContext *ctx, size_t index, const OrtValue **value, int64_t *dims, int *rank) {
    OrtStatus *st = ORT_FN(g_api, KernelContext_GetInput)(ctx, index, value);
    if (st || !*value) { *rank = -1; return st; }
    OrtTensorTypeAndShapeInfo *info = NULL;
    size_t count = 0;
    if ((st = ORT_FN(g_api, GetTensorTypeAndShape)(*value, &info))) return st;
    st = ORT_FN(g_api, GetDimensionsCount)(info, &count);
    if (!st && count > MAX_RANK) st = fail(ORT_CODE_INVALID_ARGUMENT, "edgelm operator input %zu: rank %zu is above %d", index, count, MAX_RANK);
    if (!st) st = ORT_FN(g_api, GetDimensions)(info, dims, count);
    ORT_FN(g_api, ReleaseTensorTypeAndShapeInfo)(info);
    *rank = (int)count;
    return st;
}

/* Input `index` when the node has it: its data (NULL when absent) and shape. */
static OrtStatus *optional_input(OrtKernelContext *ctx, size_t count, size_t index, void **data, int64_t *dims, int *rank) {
    const OrtValue *value = NULL;
    *data = NULL;
    *rank = -1;
    if (index >= count) return NULL;
    OrtStatus *st = input(ctx, index, &value, dims, rank);
    if (st || !value) return st;
    return ORT_FN(g_api, GetTensorMutableData)((OrtValue *)value, data);
}

/* The LayerNorm inputs (Skip, Gamma, Beta, SkipBias at 3-6) against X's shape xd (rank xr, K = xd[xr - 1]). */
static OrtStatus *norm_inputs(OrtKernelContext *ctx, size_t count, const int64_t *xd, int xr, void **skip, void **gamma,
                              void **beta, void **skip_bias) {
    int64_t d[MAX_RANK];
    int r;
    OrtStatus *st;
    const int64_t k = xd[xr - 1];
    if ((st = optional_input(ctx, count, 4, gamma, d, &r))) return st;
    if (!*gamma) return NULL;
    if (r != 1 || d[0] != k) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: Gamma must be (%lld)", (long long)k);
    if ((st = optional_input(ctx, count, 5, beta, d, &r))) return st;
    if (*beta && (r != 1 || d[0] != k)) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: Beta must be (%lld)", (long long)k);
    if ((st = optional_input(ctx, count, 6, skip_bias, d, &r))) return st;
    if (*skip_bias && (r != 1 || d[0] != k)) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: SkipBias must be (%lld)", (long long)k);
    if ((st = optional_input(ctx, count, 3, skip, d, &r))) return st;
    if (*skip && (r != xr || memcmp(d, xd, (size_t)xr * sizeof(int64_t)) != 0))
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: Skip must have X's shape");
    return NULL;
}

static OrtStatus *screened(void *kernel, Job *job, OrtKernelContext *ctx);

/* The screen's candidates of one row of a screened Job (its flags row), for the thread pool. */
typedef struct {
    const Job *job;
    const EdgelmScreen *screen;
    unsigned char *flags; /* m rows of `panels` */
} RowJob;

static void candidates_row(void *data, size_t r) {
    const RowJob *rj = (const RowJob *)data;
    const Job *j = rj->job;
    const size_t pairs = (j->k + 1) / 2;
    edgelm_screen_candidates(rj->screen, j->x + r * j->k, j->x16 + r * pairs * 2, j->xs[r], j->b, j->y + r * j->n,
                             rj->flags + r * j->panels);
}

/* The full product of the listed panels, split into `chunks` ranges of the list. */
typedef struct {
    const Job *job;
    const size_t *list;
    size_t count, chunks;
} PanelList;

static void exact_panels(void *data, size_t chunk) {
    const PanelList *pl = (const PanelList *)data;
    const Job *j = pl->job;
    for (size_t i = pl->count * chunk / pl->chunks; i < pl->count * (chunk + 1) / pl->chunks; i++)
        edgelm_linear_panels(j->x, j->m, j->k, j->w, j->b, j->y, j->n, pl->list[i], pl->list[i] + 1);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const PackedLinearKernel *op = (const PackedLinearKernel *)kernel;
    const OrtValue *xv, *wv;
    int64_t xd[MAX_RANK], wd[MAX_RANK], bd[MAX_RANK];
    int xr, wr, br;
    size_t inputs = 0, outputs = 0;
    void *b;
    OrtStatus *st;
    if ((st = input(ctx, 0, &xv, xd, &xr)) || (st = input(ctx, 1, &wv, wd, &wr))) return st;
    if ((st = ORT_FN(g_api, KernelContext_GetInputCount)(ctx, &inputs))) return st;
    if ((st = ORT_FN(g_api, KernelContext_GetOutputCount)(ctx, &outputs))) return st;
    if ((st = optional_input(ctx, inputs, 2, &b, bd, &br))) return st;
    if (xr < 1) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: X has rank %d, needs at least 1", xr);
    void *skip = NULL, *gamma = NULL, *beta = NULL, *skip_bias = NULL;
    if ((st = norm_inputs(ctx, inputs, xd, xr, &skip, &gamma, &beta, &skip_bias))) return st;
    if (outputs > 1 && !gamma) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: a second output needs Gamma (the LayerNorm)");
    int64_t k = xd[xr - 1], n = op->n, panels = (n + EDGELM_PANEL - 1) / EDGELM_PANEL;
    if (wr != 3 || wd[0] != panels || wd[2] != EDGELM_PANEL)
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: W must be (%lld, K, 16) panels for n = %lld", (long long)panels, (long long)n);
    if (wd[1] != k) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: X has %lld features, W has %lld", (long long)k, (long long)wd[1]);
    if (b && (br != 1 || bd[0] != n)) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: B must be (%lld), got a tensor of rank %d", (long long)n, br);

    int64_t yd[MAX_RANK];
    size_t m = 1;
    for (int i = 0; i < xr - 1; i++) { yd[i] = xd[i]; m *= (size_t)xd[i]; }
    yd[xr - 1] = n;
    OrtValue *yv, *hv = NULL;
    void *x, *w, *y, *h = NULL;
    if ((st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 0, yd, (size_t)xr, &yv))) return st;
    if (outputs > 1 && (st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 1, xd, (size_t)xr, &hv))) return st;
    if (m == 0 || n == 0) return NULL;
    if ((st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)xv, &x)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)wv, &w)) ||
        (hv && (st = ORT_FN(g_api, GetTensorMutableData)(hv, &h))) ||
        (st = ORT_FN(g_api, GetTensorMutableData)(yv, &y)))
        return st;

    float *normed = NULL;
    if (gamma) {  /* the LayerNorm: H into the second output (when asked for), LayerNorm(H) into a buffer */
        normed = (float *)malloc(m * (size_t)k * sizeof(float));
        if (!normed) return fail(ORT_CODE_FAIL, "PackedLinear: out of memory");
        edgelm_skip_layer_norm(x, skip, skip_bias, gamma, beta, op->epsilon, m, (size_t)k, h, normed);
        x = normed;
    }
    Job job = {x, w, b, y, m, (size_t)k, (size_t)n, (size_t)panels,
               op->chunks < (size_t)panels ? op->chunks : (size_t)panels, op->activation, NULL, 0, NULL, NULL};
    void *screen = NULL;
    int64_t sd[MAX_RANK];
    int sr;
    if ((st = optional_input(ctx, inputs, 7, &screen, sd, &sr))) { free(normed); return st; }
    if (screen && sr != 0) {
        free(normed);
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: Screen must be an int64 scalar, got rank %d", sr);
    }
    if (screen && *(const int64_t *)screen && op->activation == ACTIVATION_NONE)
        st = screened(kernel, &job, ctx);
    else
        st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_chunk, job.chunks, job.chunks, &job);
    free(normed);
    return st;
}

/* Y's argmax per row for a quarter of W's reads (screen.c): estimates of every panel, then the full
 * product of the panels that may hold an argmax; all of it where more than a quarter may (or none,
 * which finite inputs never give). The screen is built at the first call (W is a constant). */
static OrtStatus *screened(void *kernel, Job *job, OrtKernelContext *ctx) {
    PackedLinearKernel *op = (PackedLinearKernel *)kernel;
    while (atomic_flag_test_and_set(&op->building)) {}  /* another Run of this session may be building it */
    if (op->screen.q && op->screen.source != job->w) edgelm_screen_free(&op->screen);
    int ok = op->screen.q != NULL;
    OrtStatus *st = NULL;
    if (!ok && edgelm_screen_alloc(&op->screen, job->w, job->k, job->n) == 0) {  /* filled by the thread pool */
        job->screen = &op->screen, job->fill = 1;
        st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_chunk, job->chunks, job->chunks, job);
        job->screen = NULL, job->fill = 0;
        if (st) edgelm_screen_free(&op->screen);
        ok = !st;
    }
    atomic_flag_clear(&op->building);
    if (st) return st;
    if (!ok) return fail(ORT_CODE_FAIL, "PackedLinear: out of memory for the screen");
    const size_t pairs = (job->k + 1) / 2, panels = job->panels;
    int16_t *x16 = (int16_t *)malloc(job->m * pairs * 2 * sizeof(int16_t));
    float *xs = (float *)malloc(job->m * sizeof(float));
    unsigned char *flags = (unsigned char *)malloc(job->m * panels);  /* each row's candidates */
    size_t *list = (size_t *)malloc(panels * sizeof(size_t));
    if (!x16 || !xs || !flags || !list) {
        st = fail(ORT_CODE_FAIL, "PackedLinear: out of memory");
        goto done;
    }
    edgelm_screen_quantize_x(job->x, job->m, job->k, x16, xs);
    job->screen = &op->screen, job->x16 = x16, job->xs = xs;
    st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_chunk, job->chunks, job->chunks, job);
    job->screen = NULL;
    if (st) goto done;
    RowJob rows = {job, &op->screen, flags};
    if ((st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, candidates_row, job->m, job->m, &rows))) goto done;
    size_t marked = 0;
    for (size_t p = 0; p < panels; p++) {
        int any = 0;
        for (size_t r = 0; r < job->m; r++) any |= flags[r * panels + p];
        if (any) list[marked++] = p;
    }
    if (marked == 0 || marked * 4 > panels) {
        st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_chunk, job->chunks, job->chunks, job);
        goto done;
    }
    PanelList exact = {job, list, marked, marked < job->chunks ? marked : job->chunks};
    st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, exact_panels, exact.chunks, exact.chunks, &exact);
done:
    free(x16), free(xs), free(flags), free(list);
    return st;
}

/* Optional attributes: *out keeps its default when the node has none. */
static void optional_int(const OrtKernelInfo *info, const char *name, int64_t *out) {
    int64_t value;
    OrtStatus *st = ORT_FN(g_api, KernelInfoGetAttribute_int64)(info, name, &value);
    if (st) ORT_FN(g_api, ReleaseStatus)(st);
    else *out = value;
}

static void optional_float(const OrtKernelInfo *info, const char *name, float *out) {
    float value;
    OrtStatus *st = ORT_FN(g_api, KernelInfoGetAttribute_float)(info, name, &value);
    if (st) ORT_FN(g_api, ReleaseStatus)(st);
    else *out = value;
}

/* The attribute n (columns of PackedLinear, rows of PackedEmbedding's table): required, positive. */
static OrtStatus *attribute_n(const OrtKernelInfo *info, const char *op_name, int64_t *n) {
    *n = 0;
    OrtStatus *st = ORT_FN(g_api, KernelInfoGetAttribute_int64)(info, "n", n);
    if (st) return st;
    if (*n <= 0) return fail(ORT_CODE_INVALID_ARGUMENT, "%s: attribute n is %lld, must be positive", op_name, (long long)*n);
    return NULL;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api;
    int64_t n;
    OrtStatus *st = attribute_n(info, "PackedLinear", &n);
    if (st) return st;
    int64_t activation = ACTIVATION_NONE;
    optional_int(info, "activation", &activation);
    if (activation != ACTIVATION_NONE && activation != ACTIVATION_GELU_TANH)
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: activation %lld is not 0 (none) or 1 (gelu_tanh)",
                    (long long)activation);
    PackedLinearKernel *k = (PackedLinearKernel *)malloc(sizeof *k);
    if (!k) return fail(ORT_CODE_FAIL, "PackedLinear: out of memory");
    k->n = n;
    k->activation = activation;
    k->epsilon = 1e-5f;
    optional_float(info, "epsilon", &k->epsilon);
    /* Each thread takes whole chunks: a few per thread keeps them balanced while each stays one
     * long run of addresses for the prefetchers. EDGELM_LINEAR_CHUNKS overrides (experiments). */
    const char *env = getenv("EDGELM_LINEAR_CHUNKS");
    k->chunks = env && atoi(env) > 0 ? (size_t)atoi(env) : 8;
    memset(&k->screen, 0, sizeof k->screen);
    atomic_flag_clear(&k->building);
    *kernel = k;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }
static void destroy_linear(void *kernel) {
    edgelm_screen_free(&((PackedLinearKernel *)kernel)->screen);
    free(kernel);
}
static const char *op_name(const OrtCustomOp *op) { (void)op; return "PackedLinear"; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_float(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_TYPE_FLOAT; }
static size_t op_eight(const OrtCustomOp *op) { (void)op; return 8; }
static int linear_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 7 ? ORT_TYPE_INT64 : ORT_TYPE_FLOAT; }
static size_t op_two(const OrtCustomOp *op) { (void)op; return 2; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i >= 2 ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; return i >= 1 ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED; }
static int all_required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_IO_REQUIRED; }
static int memory_default(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_MEM_DEFAULT; }
static int arity_one(const OrtCustomOp *op) { (void)op; return 1; }
static int homogeneous(const OrtCustomOp *op) { (void)op; return 1; }

/* One OrtCustomOp: what differs between edgelm's operators; every other field is the same for all. */
#define CUSTOM_OP(name, input_type, inputs, outputs, input_kind_fn, output_kind_fn, create, run, destroy) {     \
    .version = API_VERSION, .GetName = name, .GetExecutionProviderType = op_provider,                          \
    .GetInputType = input_type, .GetInputTypeCount = inputs, .GetOutputType = op_float,                         \
    .GetOutputTypeCount = outputs, .KernelDestroy = destroy, .GetInputCharacteristic = input_kind_fn,           \
    .GetOutputCharacteristic = output_kind_fn, .GetInputMemoryType = memory_default,                            \
    .GetVariadicInputMinArity = arity_one, .GetVariadicInputHomogeneity = homogeneous,                          \
    .GetVariadicOutputMinArity = arity_one, .GetVariadicOutputHomogeneity = homogeneous,                        \
    .CreateKernelV2 = create, .KernelComputeV2 = run }

static const OrtCustomOp packed_linear = CUSTOM_OP(op_name, linear_input_type, op_eight, op_two, input_kind, output_kind,
                                                   create_kernel, compute, destroy_linear);

/* ---- ai.edgelm.PackedEmbedding ------------------------------------------------------------------ */
static OrtStatus *embedding_compute(void *kernel, OrtKernelContext *ctx) {
    const int64_t n = *(const int64_t *)kernel;
    const OrtValue *iv, *wv;
    int64_t id[MAX_RANK + 1], wd[MAX_RANK];
    int ir, wr;
    OrtStatus *st;
    if ((st = input(ctx, 0, &iv, id, &ir)) || (st = input(ctx, 1, &wv, wd, &wr))) return st;
    const int64_t panels = (n + EDGELM_PANEL - 1) / EDGELM_PANEL;
    if (wr != 3 || wd[0] != panels || wd[2] != EDGELM_PANEL)
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedEmbedding: W must be (%lld, D, 16) panels for n = %lld", (long long)panels, (long long)n);
    if (ir >= MAX_RANK) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedEmbedding: ids of rank %d, at most %d", ir, MAX_RANK - 1);
    const int64_t D = wd[1];
    size_t count = 1;
    for (int i = 0; i < ir; i++) count *= (size_t)id[i];
    id[ir] = D;
    OrtValue *yv;
    void *ids, *w, *y;
    if ((st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 0, id, (size_t)ir + 1, &yv))) return st;
    if (count == 0 || D == 0) return NULL;
    if ((st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)iv, &ids)) || (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)wv, &w)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)(yv, &y)))
        return st;
    for (size_t t = 0; t < count; t++) {  /* token v is lane v % 16 of panel v / 16: D floats 16 apart */
        const int64_t v = ((const int64_t *)ids)[t];
        if (v < 0 || v >= n)
            return fail(ORT_CODE_INVALID_ARGUMENT, "PackedEmbedding: token id %lld is outside [0, %lld)", (long long)v, (long long)n);
        const float *src = (const float *)w + (size_t)(v / EDGELM_PANEL) * (size_t)D * EDGELM_PANEL + (size_t)(v % EDGELM_PANEL);
        float *dst = (float *)y + t * (size_t)D;
        for (int64_t k = 0; k < D; k++) dst[k] = src[k * EDGELM_PANEL];
    }
    return NULL;
}

static OrtStatus *embedding_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api;
    int64_t n;
    OrtStatus *st = attribute_n(info, "PackedEmbedding", &n);
    if (st) return st;
    int64_t *k = (int64_t *)malloc(sizeof *k);
    if (!k) return fail(ORT_CODE_FAIL, "PackedEmbedding: out of memory");
    *k = n;
    *kernel = k;
    return NULL;
}

static const char *embedding_name(const OrtCustomOp *op) { (void)op; return "PackedEmbedding"; }
static int embedding_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ORT_TYPE_INT64 : ORT_TYPE_FLOAT; }
static size_t op_one(const OrtCustomOp *op) { (void)op; return 1; }

static const OrtCustomOp packed_embedding = CUSTOM_OP(embedding_name, embedding_input_type, op_two, op_one,
                                                     all_required, all_required, embedding_create, embedding_compute, destroy_kernel);

/* ---- ai.edgelm.CachedAttention ------------------------------------------------------------------ */
typedef struct {
    int64_t heads, kv_heads, window, sliding;
    float scale;  /* 0: 1 / sqrt(H) */
} AttentionKernel;

static void run_unit(void *data, size_t unit) { edgelm_attention_unit((const EdgelmAttention *)data, unit); }

static OrtStatus *attention_compute(void *kernel, OrtKernelContext *ctx) {
    const AttentionKernel *op = (const AttentionKernel *)kernel;
    const OrtValue *qv, *pkv, *pvv;
    int64_t qd[MAX_RANK], kd[MAX_RANK], vd[MAX_RANK], ld[MAX_RANK], td[MAX_RANK], bd[MAX_RANK], md[MAX_RANK];
    int qr, kr, vr, lr, tr, br, mr;
    size_t inputs = 0;
    void *lens, *totalp, *bias, *mask;
    OrtStatus *st;
    if ((st = input(ctx, 0, &qv, qd, &qr)) || (st = input(ctx, 1, &pkv, kd, &kr)) || (st = input(ctx, 2, &pvv, vd, &vr)))
        return st;
    if ((st = ORT_FN(g_api, KernelContext_GetInputCount)(ctx, &inputs)) ||
        (st = optional_input(ctx, inputs, 3, &lens, ld, &lr)) || (st = optional_input(ctx, inputs, 4, &totalp, td, &tr)) ||
        (st = optional_input(ctx, inputs, 5, &bias, bd, &br)) || (st = optional_input(ctx, inputs, 6, &mask, md, &mr)))
        return st;
    if (qr != 3) return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: QKV has rank %d, needs (B, S, (N + 2 Nkv) H)", qr);
    if (kr != 4 || vr != 4 || memcmp(kd, vd, 4 * sizeof(int64_t)) != 0)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: past_key and past_value must both be (B, Nkv, C, H)");
    const int64_t B = qd[0], S = qd[1], H = kd[3], C = kd[2], N = op->heads, Nkv = op->kv_heads;
    if (kd[0] != B || kd[1] != Nkv || qd[2] != (N + 2 * Nkv) * H)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: QKV (%lld, %lld, %lld) and past (%lld, %lld, %lld, %lld) do not fit "
                    "%lld heads, %lld KV heads", (long long)B, (long long)S, (long long)qd[2], (long long)kd[0], (long long)kd[1],
                    (long long)C, (long long)H, (long long)N, (long long)Nkv);
    if (lens && (lr != 1 || ld[0] != B)) return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: seqlens_k must be (B) = (%lld)", (long long)B);
    if (totalp && (tr > 1 || (tr == 1 && td[0] != 1)))
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: total_sequence_length must be one int32");
    if (mask && (mr != 2 || md[0] != B))
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: attention_mask must be (B, T) with B = %lld", (long long)B);
    if (mask && bias) return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: give attention_bias or attention_mask, not both");
    if (!mask && !totalp)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: needs attention_mask, or seqlens_k and total_sequence_length");
    const int64_t T = mask ? md[1] : *(const int32_t *)totalp, P = T - S;
    if (mask && totalp && *(const int32_t *)totalp != T)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: total_sequence_length %d is not attention_mask's width %lld",
                    *(const int32_t *)totalp, (long long)T);
    if (P < 0) return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: %lld tokens in total are below the %lld new tokens", (long long)T, (long long)S);
    for (int64_t b = 0; lens && b < B; b++)
        if (((const int32_t *)lens)[b] != T - 1)
            return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: seqlens_k[%lld] is %d; every row takes total_sequence_length - 1 "
                        "(left padding goes in attention_bias)", (long long)b, ((const int32_t *)lens)[b]);
    void *qkv, *past_k, *past_v;
    if ((st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)qv, &qkv)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)pkv, &past_k)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)pvv, &past_v)))
        return st;
    const int sliding = op->sliding && op->window > 0;
    if (sliding && C < op->window)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: a sliding cache of %lld rows is below the window of %lld", (long long)C, (long long)op->window);
    if (!sliding && P > C)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: past holds %lld rows, fewer than the %lld tokens before this step", (long long)C, (long long)P);
    if (bias && (br != 4 || (bd[0] != 1 && bd[0] != B) || (bd[1] != 1 && bd[1] != N) || bd[2] != S || bd[3] != T))
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: attention_bias must be (B or 1, N or 1, S, T) = (%lld, %lld, %lld, %lld)",
                    (long long)B, (long long)N, (long long)S, (long long)T);

    const int64_t Cp = sliding ? C : (C > T ? C : T);
    int64_t yd[3] = {B, S, N * H}, cd[4] = {B, Nkv, Cp, H};
    OrtValue *yv, *ckv, *cvv;
    void *y, *present_k, *present_v;
    if ((st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 0, yd, 3, &yv)) ||
        (st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 1, cd, 4, &ckv)) ||
        (st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 2, cd, 4, &cvv)))
        return st;
    if (B == 0 || S == 0 || N == 0 || H == 0) return NULL;
    if ((st = ORT_FN(g_api, GetTensorMutableData)(yv, &y)) || (st = ORT_FN(g_api, GetTensorMutableData)(ckv, &present_k)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)(cvv, &present_v)))
        return st;
    /* one row of scores per unit, then (with attention_mask) the bias each row's mask gives */
    float *scratch = (float *)malloc((size_t)(B * Nkv * T + (mask ? B * T : 0)) * sizeof(float));
    if (!scratch) return fail(ORT_CODE_FAIL, "CachedAttention: out of memory");
    if (mask) {
        float *row_bias = scratch + B * Nkv * T;
        for (int64_t i = 0; i < B * T; i++) row_bias[i] = ((const int64_t *)mask)[i] ? 0.0f : MASKED_SCORE;
        bias = row_bias;
        bd[0] = B, bd[1] = 1, bd[2] = 1;
    }
    EdgelmAttention job = {
        .qkv = qkv, .past_k = past_k, .past_v = past_v, .present_k = present_k, .present_v = present_v,
        .bias = bias, .out = y, .scratch = scratch,
        .batch = (size_t)B, .seq = (size_t)S, .heads = (size_t)N, .kv_heads = (size_t)Nkv, .head_size = (size_t)H,
        .capacity = (size_t)C, .present_capacity = (size_t)Cp, .total = (size_t)T,
        .bias_b = bias ? (size_t)bd[0] : 1, .bias_n = bias ? (size_t)bd[1] : 1, .bias_rows = bias ? (size_t)bd[2] : 1,
        .window = op->window > 0 ? (size_t)op->window : 0, .sliding = sliding,
        .scale = op->scale != 0.0f ? op->scale : 1.0f / sqrtf((float)H),
    };
    size_t units = (size_t)(B * Nkv);
    st = ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_unit, units, units, &job);
    free(scratch);
    return st;
}

static OrtStatus *attention_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api;
    AttentionKernel k = {0, 0, -1, 0, 0.0f};
    OrtStatus *st = ORT_FN(g_api, KernelInfoGetAttribute_int64)(info, "num_heads", &k.heads);
    if (st) return st;
    k.kv_heads = k.heads;
    optional_int(info, "kv_num_heads", &k.kv_heads);
    optional_int(info, "local_window_size", &k.window);
    optional_int(info, "sliding_window_cache", &k.sliding);
    optional_float(info, "scale", &k.scale);
    if (k.heads <= 0 || k.kv_heads <= 0 || k.heads % k.kv_heads)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: num_heads %lld must be a positive multiple of kv_num_heads %lld",
                    (long long)k.heads, (long long)k.kv_heads);
    if (k.sliding && k.window <= 0)
        return fail(ORT_CODE_INVALID_ARGUMENT, "CachedAttention: sliding_window_cache needs local_window_size > 0");
    AttentionKernel *out = (AttentionKernel *)malloc(sizeof *out);
    if (!out) return fail(ORT_CODE_FAIL, "CachedAttention: out of memory");
    *out = k;
    *kernel = out;
    return NULL;
}

static const char *attention_name(const OrtCustomOp *op) { (void)op; return "CachedAttention"; }
static int attention_input_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? ORT_TYPE_INT32 : i == 6 ? ORT_TYPE_INT64 : ORT_TYPE_FLOAT;
}
static size_t attention_inputs(const OrtCustomOp *op) { (void)op; return 7; }
static size_t op_three_out(const OrtCustomOp *op) { (void)op; return 3; }
static int attention_input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i >= 3 ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED; }

static const OrtCustomOp cached_attention = CUSTOM_OP(attention_name, attention_input_type, attention_inputs, op_three_out,
                                                     attention_input_kind, all_required, attention_create, attention_compute, destroy_kernel);

EDGELM_EXPORT
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(API_VERSION);
    if (!api) {  /* an ONNX Runtime older than 1.17: say so through the oldest API */
        const OrtApi *v1 = base->GetApi(1);
        return v1 ? ORT_FN(v1, CreateStatus)(ORT_CODE_FAIL, "edgelm's operators need ONNX Runtime 1.17 or newer") : NULL;
    }
    g_api = api;
    OrtCustomOpDomain *domain = NULL;  /* lives as long as the process: sessions keep using it */
    OrtStatus *st = ORT_FN(api, CreateCustomOpDomain)("ai.edgelm", &domain);
    if (!st) st = ORT_FN(api, CustomOpDomain_Add)(domain, &packed_linear);
    if (!st) st = ORT_FN(api, CustomOpDomain_Add)(domain, &packed_embedding);
    if (!st) st = ORT_FN(api, CustomOpDomain_Add)(domain, &cached_attention);
    if (!st) st = ORT_FN(api, AddCustomOpDomain)(options, domain);
    return st;
}

/* For ctypes callers (edgelm.runtime.native): the kernel without ONNX Runtime. */
EDGELM_EXPORT
void edgelm_linear(const float *x, size_t m, size_t k, const float *w, const float *b, float *y, size_t n) {
    edgelm_linear_panels(x, m, k, w, b, y, n, 0, (n + EDGELM_PANEL - 1) / EDGELM_PANEL);
}
