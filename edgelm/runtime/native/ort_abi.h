/* The part of ONNX Runtime's C ABI that edgelm's operator library uses, declared here because
 * no package we can install ships onnxruntime_c_api.h.
 *
 * OrtApi is a table of function pointers that only ever grows at its end: a slot keeps its index in
 * every release. The indices below were read from the API's own table (onnxruntime_c_api.cc, which
 * static_asserts many of them) and checked call by call against onnxruntime 1.32.0. On Linux and
 * macOS ORT_API_CALL is empty, so these are plain C function pointers.
 */
#ifndef EDGELM_ORT_ABI_H
#define EDGELM_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;  /* used only as a table of pointers, through ORT_FN below */
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ORT_TYPE_FLOAT = 1, ORT_TYPE_INT32 = 6, ORT_TYPE_INT64 = 7 };             /* ONNXTensorElementDataType */
enum { ORT_IO_REQUIRED = 0, ORT_IO_OPTIONAL = 1 };           /* OrtCustomOpInputOutputCharacteristic */
enum { ORT_MEM_DEFAULT = 0 };                                /* OrtMemType */
enum { ORT_CODE_FAIL = 1, ORT_CODE_INVALID_ARGUMENT = 2 };   /* OrtErrorCode */

/* ONNX Runtime reads the members past KernelDestroy according to `version`: >= 8 the input and
 * output characteristics, > 12 the input memory types, >= 14 the variadic arities, >= 16 the V2
 * kernel functions, >= 17 shape inference and opset ranges (NULL = none). */
typedef struct OrtCustomOp OrtCustomOp;
struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const OrtCustomOp *op);  /* NULL result = CPU */
    int (*GetInputType)(const OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const OrtCustomOp *op);
    int (*GetOutputType)(const OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    OrtStatus *(*InferOutputShapeFn)(const OrtCustomOp *op, OrtShapeInferContext *ctx);
    int (*GetStartVersion)(const OrtCustomOp *op);
    int (*GetEndVersion)(const OrtCustomOp *op);
    size_t (*GetMayInplace)(int **input_index, int **output_index);
    void (*ReleaseMayInplace)(int *input_index, int *output_index);
    size_t (*GetAliasMap)(int **input_index, int **output_index);
    void (*ReleaseAliasMap)(int *input_index, int *output_index);
};

/* OrtApi slots (zero-based) and the types of the functions in them. */
#define ORT_SLOT_CreateStatus 0
#define ORT_SLOT_GetErrorMessage 2
#define ORT_SLOT_CreateCustomOpDomain 26
#define ORT_SLOT_CustomOpDomain_Add 27
#define ORT_SLOT_AddCustomOpDomain 28
#define ORT_SLOT_GetTensorMutableData 51
#define ORT_SLOT_GetDimensionsCount 61
#define ORT_SLOT_GetDimensions 62
#define ORT_SLOT_GetTensorTypeAndShape 65
#define ORT_SLOT_KernelInfoGetAttribute_float 85
#define ORT_SLOT_KernelInfoGetAttribute_int64 86
#define ORT_SLOT_KernelContext_GetInputCount 88
#define ORT_SLOT_KernelContext_GetOutputCount 89
#define ORT_SLOT_KernelContext_GetInput 90
#define ORT_SLOT_KernelContext_GetOutput 91
#define ORT_SLOT_ReleaseStatus 93
#define ORT_SLOT_ReleaseTensorTypeAndShapeInfo 99
#define ORT_SLOT_KernelContext_ParallelFor 274  /* since 1.17 */

typedef OrtStatus *(*OrtCreateStatusFn)(int code, const char *msg);
typedef const char *(*OrtGetErrorMessageFn)(const OrtStatus *status);
typedef OrtStatus *(*OrtCreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*OrtCustomOpDomain_AddFn)(OrtCustomOpDomain *domain, const OrtCustomOp *op);
typedef OrtStatus *(*OrtAddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*OrtGetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*OrtGetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*OrtGetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count);
typedef OrtStatus *(*OrtGetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*OrtKernelInfoGetAttribute_floatFn)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*OrtKernelInfoGetAttribute_int64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*OrtKernelContext_GetInputCountFn)(const OrtKernelContext *context, size_t *out);
typedef OrtStatus *(*OrtKernelContext_GetOutputCountFn)(const OrtKernelContext *context, size_t *out);
typedef OrtStatus *(*OrtKernelContext_GetInputFn)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*OrtKernelContext_GetOutputFn)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                                   size_t count, OrtValue **out);
typedef void (*OrtReleaseStatusFn)(OrtStatus *status);
typedef void (*OrtReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*OrtKernelContext_ParallelForFn)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                     size_t total, size_t num_batch, void *usr_data);

/* The function in `slot` of the table `api`, as type NAME##Fn: ORT_FN(api, GetDimensions)(info, dims, n). */
#define ORT_FN(api, NAME) ((Ort##NAME##Fn)(((void *const *)(api))[ORT_SLOT_##NAME]))

#endif
