/* cblas_sgemm for MLX's CPU backend that sends each call to the BLAS fastest at its shape.
 *
 * Loaded with RTLD_GLOBAL before MLX, this file's cblas_sgemm is the one MLX's matmuls
 * bind to. A one-row product with weights (a decode step of one sequence) is a
 * matrix-vector product: it goes to OpenBLAS's threaded sgemv, which streams the weights once on every core, where
 * OpenBLAS 0.3.21's sgemm packs them first and BLIS's runs on one core. Products of a few
 * rows (decode steps of a few sequences) go to BLIS's sgemm, which reads the weights once
 * for all rows; larger ones (prompts, larger batches) to OpenBLAS's sgemm. Python sets the
 * function pointers and the row limit through mlx_relay_route_set before MLX computes
 * anything (see mlx_relay/core/blas_route.py).
 */
#include <stdint.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a,
                         int lda, const float *x, int incx, float beta, float *y, int incy);

static sgemv_fn vector_sgemv;
static sgemm_fn narrow_sgemm;
static sgemm_fn wide_sgemm;
static int narrow_rows = 8;
/* Products with a side of at most this many stay with the wide sgemm: attention's (one side
 * is the head dimension), whose results must not depend on how many positions the product
 * spans. OpenBLAS's sgemm keeps them exact; BLIS's sgemm and any sgemv's blocking do not. */
static int vector_side = 128;
/* Calls so far: [0] one-row products, [1] narrow, [2] wide. */
static uint64_t calls[3];

void mlx_relay_route_set(sgemv_fn vector, sgemm_fn narrow, sgemm_fn wide, int rows, int side) {
    vector_sgemv = vector;
    narrow_sgemm = narrow;
    wide_sgemm = wide;
    narrow_rows = rows;
    vector_side = side;
}

uint64_t mlx_relay_route_calls(int which) {
    return which >= 0 && which < 3 ? __atomic_load_n(&calls[which], __ATOMIC_RELAXED) : 0;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    int weights = n > vector_side && k > vector_side;
    if (m == 1 && weights && order == ROW_MAJOR) {
        /* c (1 x n) = a (1 x k) . op(b) (k x n): y = op(b)^T x, with b row-major. */
        __atomic_add_fetch(&calls[0], 1, __ATOMIC_RELAXED);
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) {
            vector_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        } else {
            vector_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        }
    } else if (m <= narrow_rows && weights) {
        __atomic_add_fetch(&calls[1], 1, __ATOMIC_RELAXED);
        narrow_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else {
        __atomic_add_fetch(&calls[2], 1, __ATOMIC_RELAXED);
        wide_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
