/* The CBLAS names MLX's CPU backend calls, forwarded to OpenBLAS's `scipy_` prefixed build.
 *
 * The `scipy-openblas32` wheel ships a runtime-dispatch OpenBLAS (DYNAMIC_ARCH: it
 * picks its kernels from the CPU it runs on), but every symbol carries a `scipy_`
 * prefix so that it never clashes with another BLAS in the process. MLX resolves
 * plain `cblas_sgemm` & co. when `libmlx.so` loads. `blas.py` opens OpenBLAS and then
 * this library with RTLD_GLOBAL before `mlx.core` is imported, so these definitions
 * win over the reference BLAS that the `mlx[cpu]` wheel bundles.
 *
 * The `scipy_*` symbols stay undefined here and bind to the already loaded OpenBLAS
 * at load time; each function below compiles to a single jump. No CPU-specific code.
 */
#include <Python.h>

typedef int blas_int; /* LP64: scipy-openblas32 uses 32-bit integers, as MLX does */

#define GEMM_ARGS(T, S)                                                                     \
    int order, int trans_a, int trans_b, blas_int m, blas_int n, blas_int k, S alpha,      \
        const T *a, blas_int lda, const T *b, blas_int ldb, S beta, T *c, blas_int ldc
#define GEMM_CALL order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc

#define FORWARD_GEMM(name, T, S)                                          \
    extern void scipy_##name(GEMM_ARGS(T, S));                            \
    __attribute__((visibility("default"))) void name(GEMM_ARGS(T, S)) {  \
        scipy_##name(GEMM_CALL);                                          \
    }

/* Every product goes to sgemm, one-row products included: OpenBLAS's sgemv ran MLX's
 * decode-shaped products up to 5x faster here, but it sums in another order than
 * sgemm, so a decode step alone and the same step in a batch gave different logits
 * and a sampled turn diverged (tests/test_scheduler.py). One kernel keeps a batched
 * agent's tokens identical to its solo tokens. */
FORWARD_GEMM(cblas_sgemm, float, float)
FORWARD_GEMM(cblas_dgemm, double, double)
FORWARD_GEMM(cblas_cgemm, void, const void *)
FORWARD_GEMM(cblas_zgemm, void, const void *)

/* A real (empty) extension module, so that the build tools treat this file like any other. */
static struct PyModuleDef blas_shim_module = {
    PyModuleDef_HEAD_INIT, "_blas_shim",
    "CBLAS symbols forwarded to scipy-openblas32; loaded with ctypes, not imported.", -1, NULL,
};

PyMODINIT_FUNC PyInit__blas_shim(void) { return PyModule_Create(&blas_shim_module); }
