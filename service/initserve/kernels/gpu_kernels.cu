/*
 * The GPU backend: initserve_math.h compiled by NVRTC (through CuPy) with --fmad=false, so the
 * arithmetic is the CPU backend's to the last bit. CI compiles this file with nvcc on every run
 * (tests/test_gpu.py::test_cuda_kernels_compile), GPU or not.
 *
 * One thread per Philox block of one run: thread t of the grid handles block k = t % bpr of run
 * r = t / bpr (bpr: blocks a run can touch) and writes the elements of that block inside the run.
 */
#include "initserve_math.h"

template <typename T>
__device__ __forceinline__ void is_fill_runs_kernel(int dist, const double *params, is_u64 seed,
                                                    is_u32 name0, is_u32 name1,
                                                    const is_u64 *run_starts, is_u64 n_runs,
                                                    is_u64 run_len, is_u64 blocks_per_run,
                                                    T *out) {
    is_u64 t = (is_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_runs * blocks_per_run) return;
    /* A contiguous range (one run) is the common case: spare it the 64-bit division. */
    is_u64 run = 0, k = t;
    if (n_runs > 1) {
        run = t / blocks_per_run;
        k = t - run * blocks_per_run;
    }
    is_u64 start = run_starts[run];
    is_u64 block = (start >> 2) + k;
    is_u64 end = start + run_len;
    if (block * 4 >= end) return;
    double p[8];
    for (int i = 0; i < 8; ++i) p[i] = params[i];
    is_u32 words[4];
    is_stream_block(block, (is_u32)seed, (is_u32)(seed >> 32), name0, name1, words);
    double values[4];
    is_block_values(dist, p, words, values);
    for (int j = 0; j < 4; ++j) {
        is_u64 element = block * 4 + j;
        if (element >= start && element < end) out[run * run_len + (element - start)] = (T)values[j];
    }
}

extern "C" __global__ void is_fill_runs_f64(int dist, const double *params, is_u64 seed,
                                            is_u32 name0, is_u32 name1, const is_u64 *run_starts,
                                            is_u64 n_runs, is_u64 run_len, is_u64 blocks_per_run,
                                            double *out) {
    is_fill_runs_kernel<double>(dist, params, seed, name0, name1, run_starts, n_runs, run_len,
                                blocks_per_run, out);
}

extern "C" __global__ void is_fill_runs_f32(int dist, const double *params, is_u64 seed,
                                            is_u32 name0, is_u32 name1, const is_u64 *run_starts,
                                            is_u64 n_runs, is_u64 run_len, is_u64 blocks_per_run,
                                            float *out) {
    is_fill_runs_kernel<float>(dist, params, seed, name0, name1, run_starts, n_runs, run_len,
                               blocks_per_run, out);
}

/* float32 -> bfloat16 bits, round to nearest even (values are finite: no NaN handling needed). */
extern "C" __global__ void is_f32_to_bf16(const float *in, unsigned short *out, is_u64 n) {
    is_u64 i = (is_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    is_u32 bits = __float_as_uint(in[i]);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    out[i] = (unsigned short)(bits >> 16);
}
