/*
 * The CPU backend: initserve_math.h compiled by the host C compiler, exported with a plain C ABI
 * that initserve.backends.cpu calls through ctypes (which releases the GIL, so Python threads
 * split large ranges across cores). Built by setup.py with -ffp-contract=off.
 *
 * It is also a (trivial) CPython extension module so that the import system finds the file
 * for us; the module itself holds no functions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>

#include "initserve_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One clone per ISA: wider vectors, the same bits (no FMA contraction in any of them). */
#define IS_CLONES __attribute__((target_clones("avx512f", "avx2", "avx", "default")))
#else
#define IS_CLONES
#endif

/* The explicitly vectorised fills (simd_kernels.h), one copy per ISA, chosen at run time. */
#if defined(__x86_64__) && defined(__GNUC__)
#define IS_HAVE_SIMD 1
#include <immintrin.h>
#endif
#include <string.h>

/* Everything a clone calls must be inlined into it, or it runs at the baseline ISA. */
#define IS_INLINE static inline __attribute__((always_inline))

#define IS_TILE_BLOCKS 128

typedef struct {
    is_u32 seed_lo, seed_hi, name0, name1;
} is_stream;

/* Values of blocks [first_block, first_block + n_blocks) into values[0 .. 4 n_blocks): the same
 * values as is_block_values, computed in two passes (Philox words into an array, then the
 * transform as a flat loop over it) so that the compiler can vectorise the arithmetic. */
IS_INLINE void is_tile(int dist, const double *params, is_stream st, is_u64 first_block,
                           int n_blocks, double *values) {
    is_u32 words[4 * IS_TILE_BLOCKS];
    for (int b = 0; b < n_blocks; ++b) {
        is_stream_block(first_block + (is_u64)b, st.seed_lo, st.seed_hi, st.name0, st.name1,
                        words + 4 * b);
    }
    int n = 4 * n_blocks;
    if (dist == IS_DIST_UNIFORM) {
        for (int i = 0; i < n; ++i) values[i] = is_uniform_value(params, words[i]);
    } else if (dist == IS_DIST_NORMAL) {
        double even[2 * IS_TILE_BLOCKS], odd[2 * IS_TILE_BLOCKS];
        for (int pair = 0; pair < n / 2; ++pair) {
            is_normal_pair(params, words[2 * pair], words[2 * pair + 1], &even[pair], &odd[pair]);
        }
        for (int pair = 0; pair < n / 2; ++pair) {
            values[2 * pair] = even[pair];
            values[2 * pair + 1] = odd[pair];
        }
    } else if (dist == IS_DIST_TRUNC_NORMAL) {
        /* Every element gets the central approximation (cheap, vectorised); only the elements in
         * the tails (15% for the default cut at +-2) are gathered and get the tail one, which
         * is_normal_quantile_ex would have selected for them: the same values, less work. */
        double p[4 * IS_TILE_BLOCKS], tail_p[4 * IS_TILE_BLOCKS];
        int tail_at[4 * IS_TILE_BLOCKS];
        for (int i = 0; i < n; ++i) {
            p[i] = is_trunc_normal_p(params, words[i]);
            values[i] = is_normal_quantile_central(p[i]);
        }
        int n_tail = 0;
        for (int i = 0; i < n; ++i) {
            if (!is_normal_quantile_is_central(p[i])) {
                tail_at[n_tail] = i;
                tail_p[n_tail++] = p[i];
            }
        }
        if (params[7] != 0.0) { /* two loops, so each is specialised and vectorised */
            for (int k = 0; k < n_tail; ++k) tail_p[k] = is_normal_quantile_tail(tail_p[k], 1);
        } else {
            for (int k = 0; k < n_tail; ++k) tail_p[k] = is_normal_quantile_tail(tail_p[k], 0);
        }
        for (int k = 0; k < n_tail; ++k) values[tail_at[k]] = tail_p[k];
        for (int i = 0; i < n; ++i) values[i] = is_trunc_normal_finish(params, values[i]);
    } else {
        for (int i = 0; i < n; ++i) values[i] = (double)words[i];
    }
}

/* Elements [start, start + count) of the stream, as float64 (out64) or rounded to float32
 * (out32, exactly one of the two non-NULL). */
IS_INLINE void is_fill(int dist, const double *params, is_u64 seed, is_u32 name0,
                           is_u32 name1, is_u64 start, is_u64 count, double *out64,
                           float *out32) {
    is_stream st = {(is_u32)seed, (is_u32)(seed >> 32), name0, name1};
    double values[4 * IS_TILE_BLOCKS];
    is_u64 end = start + count;
    is_u64 element = start;
    while (element < end) {
        is_u64 block = element >> 2;
        is_u64 last_block = (end - 1) >> 2;
        is_u64 n_blocks = last_block - block + 1;
        if (n_blocks > IS_TILE_BLOCKS) n_blocks = IS_TILE_BLOCKS;
        is_tile(dist, params, st, block, (int)n_blocks, values);
        is_u64 tile_end = (block + n_blocks) * 4;
        if (tile_end > end) tile_end = end;
        is_u64 offset = element - block * 4;
        is_u64 n = tile_end - element;
        is_u64 out_at = element - start;
        if (out64) {
            for (is_u64 j = 0; j < n; ++j) out64[out_at + j] = values[offset + j];
        } else {
            for (is_u64 j = 0; j < n; ++j) out32[out_at + j] = (float)values[offset + j];
        }
        element = tile_end;
    }
}

/* n_runs runs of run_len consecutive elements, run r starting at element run_starts[r], written
 * one after another into out: a contiguous range is one run, a hyper-rectangle is many.
 * This is the scalar reference, compiled for the baseline ISA; is_fill_runs_f64/_f32 below
 * dispatch to the vectorised copies of it, which give the same bits. */
static void is_fill_runs_f64_scalar(int dist, const double *params, is_u64 seed, is_u32 name0,
                                is_u32 name1, const is_u64 *run_starts, is_u64 n_runs,
                                is_u64 run_len, double *out) {
    for (is_u64 r = 0; r < n_runs; ++r)
        is_fill(dist, params, seed, name0, name1, run_starts[r], run_len, out + r * run_len, NULL);
}

static void is_fill_runs_f32_scalar(int dist, const double *params, is_u64 seed, is_u32 name0,
                                is_u32 name1, const is_u64 *run_starts, is_u64 n_runs,
                                is_u64 run_len, float *out) {
    for (is_u64 r = 0; r < n_runs; ++r)
        is_fill(dist, params, seed, name0, name1, run_starts[r], run_len, NULL, out + r * run_len);
}

#ifdef IS_HAVE_SIMD
/* Fills from this size on bypass the caches (simd_kernels.h, is_simd_fill): well above the
 * service's chunks (4 MiB, split across threads), well below a large in-process tensor. */
#ifndef IS_STREAM_BYTES
#define IS_STREAM_BYTES ((is_u64)16 << 20)
#endif
#include "simd_avx512.h"
#include "simd_kernels.h"
#include "simd_avx2.h"
#include "simd_kernels.h"
#endif

/* The fill paths, best last. Codes as in initserve.backends.cpu. */
enum { IS_ISA_SCALAR = 0, IS_ISA_AVX2 = 1, IS_ISA_AVX512 = 2, IS_ISA_COUNT = 3 };

int is_isa_supported(int isa) {
    if (isa == IS_ISA_SCALAR) return 1;
#ifdef IS_HAVE_SIMD
    __builtin_cpu_init();
    if (isa == IS_ISA_AVX2) return __builtin_cpu_supports("avx2");
    if (isa == IS_ISA_AVX512) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

/* -1 until the first fill (or is_isa_select) picks one. Every path gives the same bits, so a
 * thread that reads a value being changed fills correctly either way. */
static int is_isa_current = -1;

int is_isa_selected(void) {
    int isa = __atomic_load_n(&is_isa_current, __ATOMIC_RELAXED);
    if (isa < 0) {
        for (isa = IS_ISA_COUNT - 1; !is_isa_supported(isa); --isa) {
        }
        __atomic_store_n(&is_isa_current, isa, __ATOMIC_RELAXED);
    }
    return isa;
}

/* Returns 0, or -1 (and changes nothing) when this CPU cannot run that path. */
int is_isa_select(int isa) {
    if (isa < 0 || isa >= IS_ISA_COUNT || !is_isa_supported(isa)) return -1;
    __atomic_store_n(&is_isa_current, isa, __ATOMIC_RELAXED);
    return 0;
}

/* The vectorised paths cover the three distributions; raw words (a debugging code) stay scalar. */
void is_fill_runs_f64(int dist, const double *params, is_u64 seed, is_u32 name0, is_u32 name1,
                      const is_u64 *run_starts, is_u64 n_runs, is_u64 run_len, double *out) {
    int isa = dist <= IS_DIST_TRUNC_NORMAL ? is_isa_selected() : IS_ISA_SCALAR;
#ifdef IS_HAVE_SIMD
    if (isa == IS_ISA_AVX512) {
        is_simd_fill_runs_f64_avx512(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
        return;
    }
    if (isa == IS_ISA_AVX2) {
        is_simd_fill_runs_f64_avx2(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
        return;
    }
#endif
    (void)isa;
    is_fill_runs_f64_scalar(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
}

void is_fill_runs_f32(int dist, const double *params, is_u64 seed, is_u32 name0, is_u32 name1,
                      const is_u64 *run_starts, is_u64 n_runs, is_u64 run_len, float *out) {
    int isa = dist <= IS_DIST_TRUNC_NORMAL ? is_isa_selected() : IS_ISA_SCALAR;
#ifdef IS_HAVE_SIMD
    if (isa == IS_ISA_AVX512) {
        is_simd_fill_runs_f32_avx512(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
        return;
    }
    if (isa == IS_ISA_AVX2) {
        is_simd_fill_runs_f32_avx2(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
        return;
    }
#endif
    (void)isa;
    is_fill_runs_f32_scalar(dist, params, seed, name0, name1, run_starts, n_runs, run_len, out);
}

/* Raw 32-bit words [start, start + count) of the stream (word i = word i mod 4 of block i / 4). */
void is_fill_words(is_u64 seed, is_u32 name0, is_u32 name1, is_u64 start, is_u64 count,
                   is_u32 *out) {
    for (is_u64 i = 0; i < count; ++i) {
        is_u64 index = start + i;
        is_u32 words[4];
        is_stream_block(index >> 2, (is_u32)seed, (is_u32)(seed >> 32), name0, name1, words);
        out[i] = words[index & 3];
    }
}

/* Scalar entry points, so the tests can pin each piece of the arithmetic on its own. */
void is_philox_block(is_u32 *ctr, is_u32 k0, is_u32 k1) { is_philox4x32_10(ctr, k0, k1); }
double is_log_scalar(double x) { return is_log(x); }
double is_exp_scalar(double x) { return is_exp(x); }
double is_normal_quantile_scalar(double p) { return is_normal_quantile(p); }
double is_normal_lower_tail_scalar(double x) { return is_normal_lower_tail(x); }
void is_sincos_2pi_scalar(double u, double *s, double *c) { is_sincos_2pi(u, s, c); }

/* ---------------------------------------------------------------------------------------------
 * Orthogonal: Householder QR (LAPACK dgeqr2 + dorg2r, unblocked) of a column-major m x n matrix,
 * m >= n, overwritten by the m x n factor Q with each column multiplied by the sign of R's
 * diagonal (so the factorisation is unique, as torch.nn.init.orthogonal_ does). Dot products
 * use eight interleaved partial sums added in a fixed tree: a fixed order, so a fixed result,
 * and one a compiler can vectorise without reassociating anything. */

IS_INLINE double is_dot(const double *x, const double *y, is_i64 n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    is_i64 i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int lane = 0; lane < 8; ++lane) acc[lane] = acc[lane] + x[i + lane] * y[i + lane];
    }
    for (int lane = 0; i < n; ++i, ++lane) acc[lane] = acc[lane] + x[i] * y[i];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* Columns j0 <= j < j1 of the column-major m-row matrix a become H_k a_j, where H_k = I - tau v v^T
 * and v is reflector k (column k from row k down, its first entry 1). Columns are independent, so
 * any split of the range across threads gives the same bits. */
IS_CLONES void is_reflect_columns(double *a, is_i64 m, is_i64 k, is_i64 j0, is_i64 j1, double tau) {
    const double *v = a + k * m + k;
    is_i64 len = m - k;
    for (is_i64 j = j0; j < j1; ++j) {
        double *target = a + j * m + k;
        double w = tau * is_dot(v, target, len);
        for (is_i64 i = 0; i < len; ++i) target[i] = target[i] - w * v[i];
    }
}

#define IS_MAX_THREADS 64
/* Below this much work (entries touched) one reflection is not worth starting threads for. */
#define IS_PARALLEL_WORK (1 << 18)

typedef struct {
    double *a;
    is_i64 m, k, j0, j1;
    double tau;
} is_reflect_job;

static void *is_reflect_job_run(void *arg) {
    is_reflect_job *job = (is_reflect_job *)arg;
    is_reflect_columns(job->a, job->m, job->k, job->j0, job->j1, job->tau);
    return NULL;
}

/* Apply reflector k to columns k+1 .. n-1, split across up to `threads` threads. */
static void is_reflect(double *a, is_i64 m, is_i64 n, is_i64 k, double tau, int threads) {
    is_i64 first = k + 1, count = n - first;
    if (count <= 0) return;
    int parts = threads < IS_MAX_THREADS ? threads : IS_MAX_THREADS;
    if (parts > count) parts = (int)count;
    if (parts <= 1 || count * (m - k) < IS_PARALLEL_WORK) {
        is_reflect_columns(a, m, k, first, n, tau);
        return;
    }
    pthread_t ids[IS_MAX_THREADS];
    int started[IS_MAX_THREADS];
    is_reflect_job jobs[IS_MAX_THREADS];
    for (int t = 0; t < parts; ++t) {
        is_reflect_job job = {a, m, k, first + count * t / parts, first + count * (t + 1) / parts, tau};
        jobs[t] = job;
    }
    for (int t = 1; t < parts; ++t) {
        started[t] = pthread_create(&ids[t], NULL, is_reflect_job_run, &jobs[t]) == 0;
        if (!started[t]) is_reflect_job_run(&jobs[t]); /* no thread to be had: do it here */
    }
    is_reflect_job_run(&jobs[0]);
    for (int t = 1; t < parts; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
    }
}

/* tau and diag are scratch arrays of n doubles. Returns 0, or -1 if a column was exactly zero. */
int is_orthonormal_columns(double *a, is_i64 m, is_i64 n, double *tau, double *diag, int threads) {
    /* reflector k lives in column k below the diagonal, with an implicit leading 1 */
    for (is_i64 k = 0; k < n; ++k) {
        double *col = a + k * m;
        is_i64 len = m - k;
        double alpha = col[k];
        double norm = IS_SQRT(is_dot(col + k, col + k, len));
        if (norm == 0.0) return -1;
        double beta = alpha >= 0.0 ? -norm : norm;
        double v0 = alpha - beta;
        for (is_i64 i = k + 1; i < m; ++i) col[i] = col[i] / v0;
        tau[k] = (beta - alpha) / beta;
        diag[k] = beta;
        col[k] = 1.0;
        is_reflect(a, m, n, k, tau[k], threads);
    }
    /* Form Q = H_0 H_1 ... H_{n-1} applied to the first n columns of I, from the last reflector
     * back (dorg2r). Column k of a still holds reflector k from row k + 1 down; it is consumed as
     * column k of Q is built. */
    for (is_i64 k = n - 1; k >= 0; --k) {
        double *col = a + k * m;
        /* columns j > k of Q already hold H_{k+1}..H_{n-1} e_j; apply H_k to them. */
        col[k] = 1.0;
        is_reflect(a, m, n, k, tau[k], threads);
        /* column k of Q: H_k e_k = e_k - tau v v^T e_k = e_k - tau v (v[0] = 1). */
        for (is_i64 i = k + 1; i < m; ++i) col[i] = -tau[k] * col[i];
        col[k] = 1.0 - tau[k];
        for (is_i64 i = 0; i < k; ++i) col[i] = 0.0;
    }
    for (is_i64 k = 0; k < n; ++k) {
        if (diag[k] < 0.0) {
            double *col = a + k * m;
            for (is_i64 i = 0; i < m; ++i) col[i] = -col[i];
        }
    }
    return 0;
}

static struct PyModuleDef is_module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                       "initserve CPU kernels (called through ctypes).", -1,
                                       NULL};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&is_module); }
