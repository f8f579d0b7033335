/* cblas_sgemm for MLX's CPU backend that sends each call to the code fastest at its shape.
 *
 * Loaded with RTLD_GLOBAL before MLX, this file's cblas_sgemm is the one MLX's matmuls
 * bind to. A product of rows of activations with a layer's weights (a decode step's, a
 * prompt's) runs in this file's own kernel: it streams each weight row from memory once, for
 * all rows at once (a prompt's a block of rows at a time), on the router's threads, where a
 * general sgemm first packs the weights (twice the memory traffic). A small
 * product, with a side of at most vector_side (attention's: in a decode step one query row a
 * head against the positions in use), runs here too, each output in one order whatever the
 * rows. Other one-row products with weights go to OpenBLAS's threaded sgemv, and
 * everything else to OpenBLAS's sgemm. Python sets the function
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
#include <stdlib.h>
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
/* Products of at most this many rows with weights go to the kernel (0: never; Python sets
 * it: all of them). */
static int rows_limit = 16;
/* Products with a side of at most this many are not the weights': attention's (one side is
 * the head dimension), whose results must not depend on how many positions the product
 * spans. This file's small products and OpenBLAS's sgemm keep them exact; a sgemv's blocking
 * does not. */
static int vector_side = 128;
/* Small products (attention's) computed here (0: all to the wide sgemm;
 * mlx_relay_route_small), on the calling thread below small_threaded multiply-adds, on the
 * router's threads from there (a long prompt's). */
static int small_on = 1;
static double small_threaded = 1 << 23;
/* Calls so far: [0] one-row products to sgemv, [1] the kernel, [2] wide, [3] small. */
static uint64_t calls[4];

/* ---- the kernel: c (m x n) = a (m x k) . b^T, b the n x k weights, row-major ---- */

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__aarch64__)
#define LANES 4 /* NEON: one register a vector, 32 of them */
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
/* A tile: ROWS_TILE rows of a times COLS_TILE weight rows, one accumulator each (24 of the
 * 32 vector registers; 4 x 4 before: 16 rows over the bundled model's layers 21.0-22.0 ->
 * 16.9-19.3 ms a pass, 2 threads, three runs alternating the two). */
#define ROWS_TILE 4
#define COLS_TILE 6
/* A prompt's rows a block at a time: 128 rows of depth 1,536 fill 768 KB of a 2 MB L2
 * (256 rows x 1,536 x 576 in cache, 2 threads: blocks of 64 / 128 / 256 rows 1.26 / 1.30 /
 * 1.35 ms; 1,024 rows 5.27 / 5.12 / 5.30 ms). */
#define ROW_BLOCK 128

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

#if LANES == 16
#include <immintrin.h>
/* Sixteen accumulators' sums in one vector, lane t holding v[t]'s: each step adds the pairs
 * of lanes that sum_lanes adds (t + 8, then t + 4, then (0 + 2) + (1 + 3)), so every sum has
 * sum_lanes' bits; shuffles gather sixteen accumulators' lanes so that one vector add does a
 * step for all of them (sum_lanes one by one took a third of a 16-row tile's time). */
static inline __attribute__((always_inline)) __m512 sum_16(const vec *v) {
    __m512 u[8], r[4], s[2];
    for (int t = 0; t < 8; t++) { /* [v0 lanes 0-7 | v1 lanes 0-7] + [v0 8-15 | v1 8-15] */
        __m512 x = (__m512)v[2 * t], y = (__m512)v[2 * t + 1];
        u[t] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int t = 0; t < 4; t++) { /* blocks of four lanes: block 0 + block 1 of each sum */
        __m512 x = u[2 * t], y = u[2 * t + 1];
        r[t] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    }
    for (int t = 0; t < 2; t++) { /* in each block: lanes 0 + 2 and 1 + 3 */
        __m512 x = r[2 * t], y = r[2 * t + 1];
        s[t] = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
    }
    __m512 f = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
    /* Lane 4b + l of f holds v[4l + b]'s sum. */
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, f);
}
#endif

/* Bytes of weights to fetch into cache while a tile computes: from `from` to `to`, `lines`
 * cache lines an iteration (from NULL: none). */
typedef struct {
    const char *from, *to;
    int lines;
} ahead_t;

static inline __attribute__((always_inline)) void tile(const int rows, const int cols, int k,
                                                       const float *a, int lda, const float *b,
                                                       int ldb, float *c, int ldc,
                                                       ahead_t ahead) {
    vec acc[ROWS_TILE * COLS_TILE];
    for (int t = 0; t < rows * cols; t++) acc[t] = (vec){0};
    for (int p = 0; p < k; p += LANES) {
        vec w[COLS_TILE];
        for (int j = 0; j < cols; j++) w[j] = load(b + (size_t)j * ldb + p);
        for (int q = 0; q < ahead.lines && ahead.from < ahead.to; q++, ahead.from += 64)
            __builtin_prefetch(ahead.from, 0, 3);
        for (int i = 0; i < rows; i++) {
            vec x = load(a + (size_t)i * lda + p);
            for (int j = 0; j < cols; j++) acc[i * cols + j] += x * w[j];
        }
    }
#if LANES == 16
    for (int g = 0; g < rows * cols; g += 16) {
        vec v[16];
        for (int t = 0; t < 16; t++) v[t] = g + t < rows * cols ? acc[g + t] : (vec){0};
        float sums[16];
        _mm512_storeu_ps(sums, sum_16(v));
        for (int t = g; t < g + 16 && t < rows * cols; t++)
            c[(size_t)(t / cols) * ldc + t % cols] = sums[t - g];
    }
#else
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) c[(size_t)i * ldc + j] = sum_lanes(acc[i * cols + j]);
#endif
}

/* One function a tile size, so that each keeps its accumulators in registers (one function
 * for all sizes measured ~10 % slower at 16 rows). */
typedef void (*tile_fn)(int k, const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                        ahead_t ahead);
#define TILE_FN(R, C)                                                                      \
    static __attribute__((noinline)) void tile_##R##x##C(int k, const float *a, int lda,    \
                                                         const float *b, int ldb, float *c, \
                                                         int ldc, ahead_t ahead) {         \
        tile(R, C, k, a, lda, b, ldb, c, ldc, ahead);                                      \
    }
#define TILE_ROW(R) TILE_FN(R, 1) TILE_FN(R, 2) TILE_FN(R, 3) TILE_FN(R, 4) TILE_FN(R, 5) TILE_FN(R, 6)
TILE_ROW(1)
TILE_ROW(2)
TILE_ROW(3)
TILE_ROW(4)
#define TILE_NAMES(R) {tile_##R##x1, tile_##R##x2, tile_##R##x3, tile_##R##x4, tile_##R##x5, tile_##R##x6}
static const tile_fn tiles[ROWS_TILE][COLS_TILE] = {TILE_NAMES(1), TILE_NAMES(2), TILE_NAMES(3),
                                                    TILE_NAMES(4)};

static inline void any_tile(int rows, int cols, int k, const float *a, int lda, const float *b,
                            int ldb, float *c, int ldc, ahead_t ahead) {
    tiles[rows - 1][cols - 1](k, a, lda, b, ldb, c, ldc, ahead);
}

/* The outputs of weight rows [j0, j1): each group of weight rows is read from memory once
 * and stays in cache for all rows of a; while a group computes, its tiles fetch the next
 * group into cache, each row tile its share (rows lying back to back, as weights do).
 * Measured on the bundled model's weights, 2 threads: fetching the next group in the last
 * row tile alone, 4 rows 23.0 -> 17.1 ms a pass over its layers, 16 rows 34.9 -> 30.0;
 * shared out over the row tiles, 16 rows 16.9 / 17.2 -> 15.1 / 15.3 ms, 8 rows 12.1 / 12.4
 * -> 11.3 / 11.6 ms (the 4 x 6 tiles, two runs, each alternating the two). */
static void span(int m, int k, const float *a, int lda, const float *b, int ldb, float *c,
                 int ldc, int j0, int j1) {
    /* A prompt's rows a block at a time, so that a block stays in cache while the weight
     * rows stream past it. */
    for (int i0 = 0; i0 < m; i0 += ROW_BLOCK) {
        int block = m - i0 < ROW_BLOCK ? m - i0 : ROW_BLOCK;
        const float *ab = a + (size_t)i0 * lda;
        float *cb = c + (size_t)i0 * ldc;
        int row_tiles = (block + ROWS_TILE - 1) / ROWS_TILE;
        for (int j = j0; j < j1; j += COLS_TILE) {
            int cols = j1 - j < COLS_TILE ? j1 - j : COLS_TILE;
            int next = j + COLS_TILE, next_end = next + COLS_TILE < j1 ? next + COLS_TILE : j1;
            size_t bytes =
                next < next_end && ldb == k ? (size_t)(next_end - next) * k * sizeof(float) : 0;
            size_t share = (bytes / row_tiles + 63) & ~(size_t)63;
            const char *next_rows = (const char *)(b + (size_t)next * ldb);
            for (int t = 0, i = 0; i < block; i += ROWS_TILE, t++) {
                int rows = block - i < ROWS_TILE ? block - i : ROWS_TILE;
                ahead_t ahead = {NULL, NULL, 0};
                if (share * t < bytes) {
                    size_t end = share * (t + 1) < bytes ? share * (t + 1) : bytes;
                    ahead = (ahead_t){next_rows + share * t, next_rows + end,
                                      (COLS_TILE + row_tiles - 1) / row_tiles};
                }
                any_tile(rows, cols, k, ab + (size_t)i * lda, lda, b + (size_t)j * ldb, ldb,
                         cb + (size_t)i * ldc + j, ldc, ahead);
            }
        }
    }
}

/* ---- small products: attention's, a few rows at a time ---- */

/* c (rows x LANES * blocks) = a (rows x k) . b (k x n), b row-major: each output summed over
 * k in order from zero, one multiply-add a term, whatever the rows, the columns and k's
 * extent beyond the last non-zero term (a masked position adds zero). */
static inline __attribute__((always_inline)) void tile_nn(const int rows, const int blocks, int k,
                                                          const float *a, int lda,
                                                          const float *b, int ldb, float *c,
                                                          int ldc) {
    vec acc[4][4];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < blocks; j++) acc[i][j] = (vec){0};
    for (int p = 0; p < k; p++) {
        vec w[4];
        for (int j = 0; j < blocks; j++) w[j] = load(b + (size_t)p * ldb + j * LANES);
        for (int i = 0; i < rows; i++) {
            float x = a[(size_t)i * lda + p];
            for (int j = 0; j < blocks; j++) acc[i][j] += x * w[j];
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < blocks; j++) memcpy(c + (size_t)i * ldc + j * LANES, &acc[i][j], sizeof(vec));
}

#define NN_BLOCKS(R, B, C)                                                                 \
    switch (blocks) {                                                                      \
    case 4: tile_nn(R, 4, k, a, lda, B, ldb, C, ldc); break;                               \
    case 3: tile_nn(R, 3, k, a, lda, B, ldb, C, ldc); break;                               \
    case 2: tile_nn(R, 2, k, a, lda, B, ldb, C, ldc); break;                               \
    default: tile_nn(R, 1, k, a, lda, B, ldb, C, ldc);                                     \
    }

static void small_nn(int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                     float *c, int ldc) {
    for (int i = 0; i < m; i += 4, a += (size_t)4 * lda, c += (size_t)4 * ldc) {
        int rows = m - i < 4 ? m - i : 4;
        for (int j = 0; j < n; j += 4 * LANES) {
            int blocks = (n - j) / LANES < 4 ? (n - j) / LANES : 4;
            switch (rows) {
            case 4: NN_BLOCKS(4, b + j, c + j) break;
            case 3: NN_BLOCKS(3, b + j, c + j) break;
            case 2: NN_BLOCKS(2, b + j, c + j) break;
            default: NN_BLOCKS(1, b + j, c + j)
            }
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
    int nn; /* a small product a . b (b k x n), shared out by rows of a; else a . b^T */
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
    if (job.nn) { /* groups of four rows of a */
        int groups = (job.m + 3) / 4;
        int lo = (int)((long)groups * part / job.parts) * 4;
        int hi = (int)((long)groups * (part + 1) / job.parts) * 4;
        if (hi > job.m) hi = job.m;
        if (lo < hi)
            small_nn(hi - lo, job.n, job.k, job.a + (size_t)lo * job.lda, job.lda, job.b, job.ldb,
                     job.c + (size_t)lo * job.ldc, job.ldc);
        return;
    }
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

/* A copy of the activations whose rows start on 64-byte boundaries, when theirs do not (MLX's
 * arrays start 8 bytes past one): vector loads across two cache lines halve the kernel's
 * throughput (128 rows x 1,536 x 576 in cache: 1.31 ms with both operands 16 bytes off, 1.04
 * ms with the weights 8 bytes off, 0.79 ms with the activations 8 bytes off, 0.67 ms with
 * both aligned). Up to aligned_limit bytes, one buffer a calling thread. */
static __thread float *aligned_rows;
static __thread size_t aligned_capacity;
static const size_t aligned_limit = (size_t)8 << 20;

static const float *aligned_copy(int m, int k, const float *a, int *lda) {
    int stride = (k + 15) & ~15;
    size_t bytes = (size_t)m * stride * sizeof(float);
    if (((uintptr_t)a % 64 == 0 && *lda % 16 == 0) || bytes > aligned_limit) return a;
    if (bytes > aligned_capacity) {
        free(aligned_rows);
        if (posix_memalign((void **)&aligned_rows, 64, bytes) != 0) {
            aligned_rows = NULL, aligned_capacity = 0;
            return a;
        }
        aligned_capacity = bytes;
    }
    for (int i = 0; i < m; i++)
        memcpy(aligned_rows + (size_t)i * stride, a + (size_t)i * *lda, (size_t)k * sizeof(float));
    *lda = stride;
    return aligned_rows;
}

/* c = a . b^T (nn: a . b) on the router's threads. */
static void rows_sgemm(int nn, int m, int n, int k, const float *a, int lda, const float *b,
                       int ldb, float *c, int ldc) {
    if (!nn) a = aligned_copy(m, k, a, &lda);
    int parts = threads_wanted;
    if (parts <= 1 || atomic_exchange(&busy, 1)) {
        if (nn) small_nn(m, n, k, a, lda, b, ldb, c, ldc);
        else span(m, k, a, lda, b, ldb, c, ldc, 0, n);
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
    job.a = a, job.b = b, job.c = c, job.parts = parts, job.nn = nn;
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

void mlx_relay_route_small(int on) { small_on = on; }

void mlx_relay_route_rows(int rows) { rows_limit = rows; }

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
    return which >= 0 && which < 4 ? __atomic_load_n(&calls[which], __ATOMIC_RELAXED) : 0;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    int weights = n > vector_side && k > vector_side && order == ROW_MAJOR;
    int plain = order == ROW_MAJOR && trans_a == NO_TRANS && alpha == 1.0f && beta == 0.0f;
    if (weights && m <= rows_limit && plain && trans_b == TRANS && k % LANES == 0) {
        __atomic_add_fetch(&calls[1], 1, __ATOMIC_RELAXED);
        rows_sgemm(0, m, n, k, a, lda, b, ldb, c, ldc);
    } else if (m == 1 && weights) {
        /* c (1 x n) = a (1 x k) . op(b) (k x n): y = op(b)^T x, with b row-major. */
        __atomic_add_fetch(&calls[0], 1, __ATOMIC_RELAXED);
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) {
            vector_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        } else {
            vector_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        }
    } else if (!weights && plain && small_on && (trans_b == TRANS ? k % LANES == 0 : n % LANES == 0)) {
        /* Attention's products (a decode step: one query row a head, scores over the
         * positions in use, then their weights over the values; a prompt: its rows at once),
         * and small models' products. For a decode step's, a general sgemm's set-up costs
         * more than the product (OpenBLAS: 1.1 us for 1 x 64 scores over 64 positions). Each
         * output is summed in one order whatever the rows and the positions spanned, so a prompt's rows have the same bits in one product or in chunks, and the
         * attention windows the bits of full attention. */
        __atomic_add_fetch(&calls[3], 1, __ATOMIC_RELAXED);
        int nn = trans_b == NO_TRANS;
        if ((double)m * n * k >= small_threaded) rows_sgemm(nn, m, n, k, a, lda, b, ldb, c, ldc);
        else if (nn) small_nn(m, n, k, a, lda, b, ldb, c, ldc);
        else span(m, k, a, lda, b, ldb, c, ldc, 0, n);
    } else {
        __atomic_add_fetch(&calls[2], 1, __ATOMIC_RELAXED);
        wide_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
