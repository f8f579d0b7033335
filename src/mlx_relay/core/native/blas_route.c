/* cblas_sgemm for MLX's CPU backend that sends each call to the BLAS fastest at its shape.
 *
 * Loaded with RTLD_GLOBAL before MLX, this file's cblas_sgemm is the one MLX's matmuls
 * bind to. Calls with few rows (decode steps of a few sequences) go to the "narrow" library
 * (BLIS: it streams the weights once, where OpenBLAS 0.3.21 packs them first and runs at
 * half the speed); every other call goes to the "wide" library (OpenBLAS: faster for
 * prompts and larger batches). Python sets both function pointers and the thresholds through
 * mlx_relay_route_set before MLX computes anything (see mlx_relay/core/blas_route.py).
 */
#include <stdint.h>

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

static sgemm_fn narrow_sgemm;
static sgemm_fn wide_sgemm;
/* Narrow when m <= narrow_rows, or when m <= tall_rows and n >= tall_columns. */
static int narrow_rows = 8;
static int tall_rows = 0;
static int tall_columns = 0;
static uint64_t narrow_calls;
static uint64_t wide_calls;

void mlx_relay_route_set(sgemm_fn narrow, sgemm_fn wide, int rows, int tall_m, int tall_n) {
    narrow_sgemm = narrow;
    wide_sgemm = wide;
    narrow_rows = rows;
    tall_rows = tall_m;
    tall_columns = tall_n;
}

/* Calls routed so far: which == 0 narrow, else wide (read by tests and status). */
uint64_t mlx_relay_route_calls(int which) {
    return which == 0 ? __atomic_load_n(&narrow_calls, __ATOMIC_RELAXED)
                      : __atomic_load_n(&wide_calls, __ATOMIC_RELAXED);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    int narrow = m <= narrow_rows || (m <= tall_rows && n >= tall_columns);
    if (narrow) {
        __atomic_add_fetch(&narrow_calls, 1, __ATOMIC_RELAXED);
        narrow_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else {
        __atomic_add_fetch(&wide_calls, 1, __ATOMIC_RELAXED);
        wide_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
