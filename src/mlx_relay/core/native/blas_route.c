/* cblas_sgemm for MLX's CPU backend that sends each call to the code fastest at its shape.
 *
 * Loaded with RTLD_GLOBAL before MLX, this file's cblas_sgemm is the one MLX's matmuls
 * bind to. A product of a few rows of activations with a layer's weights (the decode step
 * of up to rows_limit sequences) runs in this file's own kernel: it streams each weight row
 * from memory once, for all rows at once, on the router's threads, where a general sgemm
 * first packs the weights (twice the memory traffic) and is tuned for many rows. Other
 * one-row products with weights go to OpenBLAS's threaded sgemv, and everything else
 * (prompts, larger batches, attention) to OpenBLAS's sgemm. Python sets the function
 * pointers, the limits and the threads through mlx_relay_route_set and
 * mlx_relay_route_threads before MLX computes anything (see mlx_relay/core/blas_route.py).
 *
 * Every output of the kernel is one dot product summed in the same order whatever the
 * number of rows and threads, so a sequence's products are bit-identical alone and in a
 * batch. Built on the machine that runs it, with -march=native (vector_size below follows
 * the widest vectors the compiler may use there).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a,
                         int lda, const float *x, int incx, float beta, float *y, int incy);

static sgemv_fn vector_sgemv;
static sgemm_fn wide_sgemm;
/* Products of at most this many rows with weights go to the kernel (0: never). */
static int rows_limit = 16;
/* Products with a side of at most this many stay with the wide sgemm: attention's (one side
 * is the head dimension), whose results must not depend on how many positions the product
 * spans. OpenBLAS's sgemm keeps them exact; a sgemv's blocking does not. */
static int vector_side = 128;
/* Calls so far: [0] one-row products to sgemv, [1] the kernel, [2] wide. */
static uint64_t calls[3];

/* ---- the kernel: c (m x n) = a (m x k) . b^T, b the n x k weights, row-major ---- */

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__aarch64__)
#define LANES 4 /* NEON: one register a vector, 32 of them */
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
/* A tile: ROWS_TILE rows of a times COLS_TILE weight rows, one accumulator each. */
#define ROWS_TILE 4
#define COLS_TILE 4

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum_lanes(vec v) {
    /* Halve until four lanes are left, then a fixed order: the same for every output. */
    float f[LANES];
    memcpy(f, &v, sizeof f);
    for (int width = LANES / 2; width >= 4; width /= 2) {
        for (int i = 0; i < width; i++) f[i] += f[i + width];
    }
    return (f[0] + f[2]) + (f[1] + f[3]);
}

/* next, when not NULL: the next weight rows, fetched into cache while this tile computes. */
static inline __attribute__((always_inline)) void tile(const int rows, const int cols, int k,
                                                       const float *a, int lda, const float *b,
                                                       int ldb, float *c, int ldc,
                                                       const float *next) {
    vec acc[ROWS_TILE][COLS_TILE];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) acc[i][j] = (vec){0};
    for (int p = 0; p < k; p += LANES) {
        vec w[COLS_TILE];
        for (int j = 0; j < cols; j++) w[j] = load(b + (size_t)j * ldb + p);
        if (next) {
            for (int j = 0; j < COLS_TILE; j++) __builtin_prefetch(next + (size_t)j * ldb + p, 0, 3);
        }
        for (int i = 0; i < rows; i++) {
            vec x = load(a + (size_t)i * lda + p);
            for (int j = 0; j < cols; j++) acc[i][j] += x * w[j];
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) c[(size_t)i * ldc + j] = sum_lanes(acc[i][j]);
}

/* Constant tile sizes, so that the accumulators stay in registers. */
#define TILE_COLS(R)                                                                       \
    switch (cols) {                                                                        \
    case 4: tile(R, 4, k, a, lda, b, ldb, c, ldc, next); break;                            \
    case 3: tile(R, 3, k, a, lda, b, ldb, c, ldc, next); break;                            \
    case 2: tile(R, 2, k, a, lda, b, ldb, c, ldc, next); break;                            \
    default: tile(R, 1, k, a, lda, b, ldb, c, ldc, next);                                  \
    }

static void any_tile(int rows, int cols, int k, const float *a, int lda, const float *b,
                     int ldb, float *c, int ldc, const float *next) {
    switch (rows) {
    case 4: TILE_COLS(4) break;
    case 3: TILE_COLS(3) break;
    case 2: TILE_COLS(2) break;
    default: TILE_COLS(1)
    }
}

/* The outputs of weight rows [j0, j1): each group of weight rows is read from memory once
 * and stays in cache for all rows of a; the last rows' tile fetches the next group (measured
 * on the bundled model's weights, 2 threads: 4 rows 23.0 -> 17.1 ms a pass over its layers,
 * 16 rows 34.9 -> 30.0). */
static void span(int m, int k, const float *a, int lda, const float *b, int ldb, float *c,
                 int ldc, int j0, int j1) {
    for (int j = j0; j < j1; j += COLS_TILE) {
        int cols = j1 - j < COLS_TILE ? j1 - j : COLS_TILE;
        for (int i = 0; i < m; i += ROWS_TILE) {
            int rows = m - i < ROWS_TILE ? m - i : ROWS_TILE;
            int last = i + ROWS_TILE >= m && j + 2 * COLS_TILE <= j1;
            const float *next = last ? b + (size_t)(j + COLS_TILE) * ldb : NULL;
            any_tile(rows, cols, k, a + (size_t)i * lda, lda, b + (size_t)j * ldb, ldb,
                     c + (size_t)i * ldc + j, ldc, next);
        }
    }
}

/* ---- the router's threads: each takes a contiguous share of the weight rows ---- */

#define MAX_THREADS 64
/* How long an idle thread spins before it sleeps: longer than the gaps between one step's
 * products (attention between them takes 0.1-0.3 ms a layer at 16 rows over 64 positions;
 * a sleeping helper woken for each next product cost a batch-16 step about 4 ms), short
 * enough that a finished step stops taking cores soon after. A worker whose step is over
 * sends its helpers to sleep at once (mlx_relay_route_rest): its cores go to the stage
 * computing next. */
static double spin_seconds = 2e-3;

static struct {
    int m, n, k, lda, ldb, ldc, parts;
    const float *a, *b;
    float *c;
} job;
static int threads_wanted = 1;
static int helpers;             /* threads started besides the caller's */
static unsigned started_at;     /* the generation new helpers start from */
static atomic_uint generation;  /* bumped once per job */
static atomic_uint finished;    /* helpers done with the current job */
static atomic_uint rests;       /* bumped by mlx_relay_route_rest: spinning helpers sleep */
static atomic_int busy;         /* a job is running (a second caller computes alone) */
static int sleeping;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void run_part(int part) {
    int groups = (job.n + COLS_TILE - 1) / COLS_TILE;
    int lo = (int)((long)groups * part / job.parts) * COLS_TILE;
    int hi = (int)((long)groups * (part + 1) / job.parts) * COLS_TILE;
    if (hi > job.n) hi = job.n;
    if (lo < hi) span(job.m, job.k, job.a, job.lda, job.b, job.ldb, job.c, job.ldc, lo, hi);
}

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned seen = started_at;
    unsigned rested = atomic_load_explicit(&rests, memory_order_relaxed);
    for (;;) {
        unsigned now = atomic_load_explicit(&generation, memory_order_acquire);
        double until = 0;
        for (int spins = 0; now == seen; spins++) {
            if ((spins & 63) == 63) {
                if (atomic_load_explicit(&rests, memory_order_relaxed) != rested) break;
                double t = seconds();
                if (until == 0) until = t + spin_seconds;
                else if (t > until) break;
            }
            relax();
            now = atomic_load_explicit(&generation, memory_order_acquire);
        }
        if (now == seen) {
            pthread_mutex_lock(&lock);
            sleeping++;
            while ((now = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &lock);
            sleeping--;
            pthread_mutex_unlock(&lock);
        }
        seen = now;
        if (id < job.parts) run_part(id);
        /* Read before the caller can return: a rest after this job sends this thread to
         * sleep. */
        rested = atomic_load_explicit(&rests, memory_order_relaxed);
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* The helpers were not copied: start afresh. */
    helpers = 0;
    sleeping = 0;
    atomic_store(&busy, 0);
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static void rows_sgemm(int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                       float *c, int ldc) {
    int parts = threads_wanted;
    if (parts <= 1 || atomic_exchange(&busy, 1)) {
        span(m, k, a, lda, b, ldb, c, ldc, 0, n);
        return;
    }
    started_at = atomic_load(&generation);
    while (helpers < parts - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, (void *)(intptr_t)(helpers + 1)) != 0) break;
        pthread_detach(thread);
        helpers++;
    }
    if (parts > helpers + 1) parts = helpers + 1;
    job.m = m, job.n = n, job.k = k, job.lda = lda, job.ldb = ldb, job.ldc = ldc;
    job.a = a, job.b = b, job.c = c, job.parts = parts;
    atomic_store(&finished, 0);
    pthread_mutex_lock(&lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    if (sleeping) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    run_part(0);
    /* The helpers are about as fast; past a short spin one was descheduled (more threads
     * than free cores): give it the core. */
    for (int spins = 0; atomic_load_explicit(&finished, memory_order_acquire) < (unsigned)helpers;
         spins++) {
        if (spins < 4096) relax();
        else sched_yield();
    }
    atomic_store(&busy, 0);
}

/* ---- the interface ---- */

void mlx_relay_route_set(sgemv_fn vector, sgemm_fn wide, int rows, int side) {
    static int registered;
    if (!registered) registered = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
    vector_sgemv = vector;
    wide_sgemm = wide;
    rows_limit = rows;
    vector_side = side;
}

void mlx_relay_route_threads(int threads) {
    threads_wanted = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

void mlx_relay_route_rest(void) { atomic_fetch_add_explicit(&rests, 1, memory_order_relaxed); }

void mlx_relay_route_spin(double seconds) { spin_seconds = seconds; }

/* Helper threads started, and how many of them sleep now. */
int mlx_relay_route_helpers(int sleeping_only) {
    pthread_mutex_lock(&lock);
    int count = sleeping_only ? sleeping : helpers;
    pthread_mutex_unlock(&lock);
    return count;
}

int mlx_relay_route_lanes(void) { return LANES; }

uint64_t mlx_relay_route_calls(int which) {
    return which >= 0 && which < 3 ? __atomic_load_n(&calls[which], __ATOMIC_RELAXED) : 0;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    int weights = n > vector_side && k > vector_side && order == ROW_MAJOR;
    if (weights && m <= rows_limit && trans_a == NO_TRANS && trans_b == TRANS && alpha == 1.0f &&
        beta == 0.0f && k % LANES == 0) {
        __atomic_add_fetch(&calls[1], 1, __ATOMIC_RELAXED);
        rows_sgemm(m, n, k, a, lda, b, ldb, c, ldc);
    } else if (m == 1 && weights) {
        /* c (1 x n) = a (1 x k) . op(b) (k x n): y = op(b)^T x, with b row-major. */
        __atomic_add_fetch(&calls[0], 1, __ATOMIC_RELAXED);
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) {
            vector_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        } else {
            vector_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        }
    } else {
        __atomic_add_fetch(&calls[2], 1, __ATOMIC_RELAXED);
        wide_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
