/* edgelm's ONNX Runtime operator library: ai.edgelm.PackedLinear on the CPU provider.
 *
 *   Y = PackedLinear(X, W, B?)   attributes: n, the number of output columns;
 *                                activation (optional): 0 none (default), 1 GELU's tanh form (FastGelu)
 *   X: float (..., K)   W: float (ceil(n / 16), K, 16), 16-column panels (kernels.h)   B: float (n)
 *   Y: float (..., n) = activation(X W + B)
 *
 * ONNX Runtime loads the library with SessionOptions.register_custom_ops_library (it calls
 * RegisterCustomOps below); the panels of each call are split over ONNX Runtime's own intra-op
 * thread pool (KernelContext_ParallelFor), so no thread of ours competes with it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"
#include "ort_abi.h"

#define API_VERSION 17 /* the oldest API with KernelContext_ParallelFor */
#define MAX_RANK 8

static const OrtApi *g_api;

enum { ACTIVATION_NONE = 0, ACTIVATION_GELU_TANH = 1 };

typedef struct {
    int64_t n;          /* output columns */
    int64_t activation; /* ACTIVATION_* */
    size_t chunks;      /* contiguous panel ranges handed to the thread pool per call */
} PackedLinearKernel;

typedef struct {
    const float *x, *w, *b;
    float *y;
    size_t m, k, n, panels, chunks;
    int64_t activation;
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
    if (!st && count > MAX_RANK) st = fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: rank %zu is above %d", count, MAX_RANK);
    if (!st) st = ORT_FN(g_api, GetDimensions)(info, dims, count);
    ORT_FN(g_api, ReleaseTensorTypeAndShapeInfo)(info);
    *rank = (int)count;
    return st;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const PackedLinearKernel *op = (const PackedLinearKernel *)kernel;
    const OrtValue *xv, *wv, *bv = NULL;
    int64_t xd[MAX_RANK], wd[MAX_RANK], bd[MAX_RANK];
    int xr, wr, br = -1;
    size_t inputs = 0;
    OrtStatus *st;
    if ((st = input(ctx, 0, &xv, xd, &xr)) || (st = input(ctx, 1, &wv, wd, &wr))) return st;
    if ((st = ORT_FN(g_api, KernelContext_GetInputCount)(ctx, &inputs))) return st;
    if (inputs > 2 && (st = input(ctx, 2, &bv, bd, &br))) return st;
    if (xr < 1) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: X has rank %d, needs at least 1", xr);
    int64_t k = xd[xr - 1], n = op->n, panels = (n + EDGELM_PANEL - 1) / EDGELM_PANEL;
    if (wr != 3 || wd[0] != panels || wd[2] != EDGELM_PANEL)
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: W must be (%lld, K, 16) panels for n = %lld", (long long)panels, (long long)n);
    if (wd[1] != k) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: X has %lld features, W has %lld", (long long)k, (long long)wd[1]);
    if (br >= 0 && (br != 1 || bd[0] != n)) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: B must be (%lld), got a tensor of rank %d", (long long)n, br);

    int64_t yd[MAX_RANK];
    size_t m = 1;
    for (int i = 0; i < xr - 1; i++) { yd[i] = xd[i]; m *= (size_t)xd[i]; }
    yd[xr - 1] = n;
    OrtValue *yv;
    void *x, *w, *b = NULL, *y;
    if ((st = ORT_FN(g_api, KernelContext_GetOutput)(ctx, 0, yd, (size_t)xr, &yv))) return st;
    if (m == 0 || n == 0) return NULL;
    if ((st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)xv, &x)) ||
        (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)wv, &w)) ||
        (bv && (st = ORT_FN(g_api, GetTensorMutableData)((OrtValue *)bv, &b))) ||
        (st = ORT_FN(g_api, GetTensorMutableData)(yv, &y)))
        return st;

    Job job = {x, w, b, y, m, (size_t)k, (size_t)n, (size_t)panels,
               op->chunks < (size_t)panels ? op->chunks : (size_t)panels, op->activation};
    return ORT_FN(g_api, KernelContext_ParallelFor)(ctx, run_chunk, job.chunks, job.chunks, &job);
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api;
    int64_t n = 0;
    OrtStatus *st = ORT_FN(g_api, KernelInfoGetAttribute_int64)(info, "n", &n);
    if (st) return st;
    if (n <= 0) return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: attribute n is %lld, must be positive", (long long)n);
    int64_t activation = ACTIVATION_NONE;
    if ((st = ORT_FN(g_api, KernelInfoGetAttribute_int64)(info, "activation", &activation))) {
        ORT_FN(g_api, ReleaseStatus)(st);  /* absent: none */
        activation = ACTIVATION_NONE;
    }
    if (activation != ACTIVATION_NONE && activation != ACTIVATION_GELU_TANH)
        return fail(ORT_CODE_INVALID_ARGUMENT, "PackedLinear: activation %lld is not 0 (none) or 1 (gelu_tanh)",
                    (long long)activation);
    PackedLinearKernel *k = (PackedLinearKernel *)malloc(sizeof *k);
    if (!k) return fail(ORT_CODE_FAIL, "PackedLinear: out of memory");
    k->n = n;
    k->activation = activation;
    /* Each thread takes whole chunks: a few per thread keeps them balanced while each stays one
     * long run of addresses for the prefetchers. EDGELM_LINEAR_CHUNKS overrides (experiments). */
    const char *env = getenv("EDGELM_LINEAR_CHUNKS");
    k->chunks = env && atoi(env) > 0 ? (size_t)atoi(env) : 8;
    *kernel = k;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }
static const char *op_name(const OrtCustomOp *op) { (void)op; return "PackedLinear"; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_float(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_TYPE_FLOAT; }
static size_t op_three(const OrtCustomOp *op) { (void)op; return 3; }
static size_t op_one(const OrtCustomOp *op) { (void)op; return 1; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == 2 ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_IO_REQUIRED; }
static int memory_default(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_MEM_DEFAULT; }
static int arity_one(const OrtCustomOp *op) { (void)op; return 1; }
static int homogeneous(const OrtCustomOp *op) { (void)op; return 1; }

static const OrtCustomOp packed_linear = {
    .version = API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_float,
    .GetInputTypeCount = op_three,
    .GetOutputType = op_float,
    .GetOutputTypeCount = op_one,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = input_kind,
    .GetOutputCharacteristic = output_kind,
    .GetInputMemoryType = memory_default,
    .GetVariadicInputMinArity = arity_one,
    .GetVariadicInputHomogeneity = homogeneous,
    .GetVariadicOutputMinArity = arity_one,
    .GetVariadicOutputHomogeneity = homogeneous,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

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
    if (!st) st = ORT_FN(api, AddCustomOpDomain)(options, domain);
    return st;
}

/* For ctypes callers (edgelm.runtime.native): the kernel without ONNX Runtime. */
EDGELM_EXPORT
void edgelm_linear(const float *x, size_t m, size_t k, const float *w, const float *b, float *y, size_t n) {
    edgelm_linear_panels(x, m, k, w, b, y, n, 0, (n + EDGELM_PANEL - 1) / EDGELM_PANEL);
}
