/*
 * simd_kernels.h -- the fill kernels written once over a small vector vocabulary, and compiled
 * once per ISA: cpu_kernels.c includes an ISA header (simd_avx512.h, simd_avx2.h) and then this
 * file, which yields V_(is_simd_fill_runs_f64) and V_(is_simd_fill_runs_f32) for that ISA.
 *
 * Every value is the value of initserve_math.h's scalar code, bit for bit: the same binary64
 * operations in the same order, one lane per element. The floating-point arithmetic is written
 * with C operators on the vector types (GCC and clang define __m256d / __m512d as vector
 * extension types), so each formula reads as its scalar original; setup.py's -ffp-contract=off
 * keeps every * and + a separately rounded instruction. The intrinsics are only for what C
 * operators cannot say: Philox's 32x32->64-bit products and word shuffles, conversions, lane
 * selections, sqrt (correctly rounded, as the scalar one). Where an integer step is done another
 * way than the scalar code's (the word-to-double conversion, the quadrant's rounding, the log's
 * exponent), it is an exact computation of the same value, and the comment says why.
 *
 * Lane layout: a vw holds V_BLOCKS whole Philox blocks, words in stream order, so the output
 * needs no transpose; a Philox round (vw_philox_round, per ISA) is one vpmuludq (words 0 and 2 of
 * every block times M0, M1), one shuffle and one or two xors (and a shift on AVX2) for all of them.
 */

#define V_FN static inline __attribute__((always_inline, target(V_TARGET)))
/* Independent Philox vectors in flight: a round is a chain of about 7 cycles (vpmuludq alone
 * takes 5) and 3 (AVX-512) or 5 (AVX2) instructions, so 8 chains keep the multiplier busy. */
#define V_UNROLL 8
#define V_STEP_BLOCKS (V_UNROLL * V_BLOCKS)
/* trunc_normal works in tiles: every element gets the central approximation in vectors, the
 * elements in the tails are gathered and get the tail approximation in full vectors too. */
#define V_TILE_BLOCKS 64
#define V_ALL_LANES ((1u << V_LANES) - 1u)

typedef struct {
    vw multipliers;   /* (M0, M1) under words 0 and 2 of every block */
    vw round_keys[10]; /* each round's (k0, k1), as vw_round_key lays it out */
    vw counters[V_UNROLL]; /* (j V_BLOCKS + i, 0, name0, name1) for block i of vector j */
} V_(is_simd_stream);

V_FN void V_(is_simd_stream_init)(V_(is_simd_stream) *st, is_u64 seed, is_u32 name0,
                                   is_u32 name1) {
    is_u32 k0 = (is_u32)seed, k1 = (is_u32)(seed >> 32);
    st->multipliers = vw_pairs(IS_PHILOX_M0, IS_PHILOX_M1);
    for (int round = 0; round < 10; ++round) {
        st->round_keys[round] = vw_round_key(k0, k1);
        k0 += IS_PHILOX_W0;
        k1 += IS_PHILOX_W1;
    }
    vw counter_base =
        vw_add64(vw_block_index(), vw_pairs(0, (is_u64)name0 | ((is_u64)name1 << 32)));
    for (int j = 0; j < V_UNROLL; ++j) {
        st->counters[j] = vw_add64(counter_base, vw_pairs((is_u64)(j * V_BLOCKS), 0));
    }
}

/* Blocks [block, block + V_STEP_BLOCKS) of the stream: is_stream_block, V_BLOCKS at a time. */
V_FN void V_(is_simd_philox)(const V_(is_simd_stream) *st, is_u64 block, vw words[V_UNROLL]) {
    vw step = vw_pairs(block, 0); /* 64-bit adds: a carry into the block's high word is kept */
    for (int j = 0; j < V_UNROLL; ++j) words[j] = vw_round_in(vw_add64(st->counters[j], step));
    for (int round = 0; round < 9; ++round) {
        for (int j = 0; j < V_UNROLL; ++j) {
            words[j] = vw_philox_round(words[j], st->multipliers, st->round_keys[round]);
        }
    }
    for (int j = 0; j < V_UNROLL; ++j) {
        words[j] = vw_philox_last_round(words[j], st->multipliers, st->round_keys[9]);
    }
}

/* is_unit_open of words w placed by vw_*_to_unit_bits as the low 32 mantissa bits of 2^20, i.e.
 * the doubles 2^20 + w 2^-32, exactly, with no conversion instruction: subtracting 2^20 - 2^-33
 * (a double: 53 one bits) is exact (Sterbenz: both lie in [2^19, 2^21)) and leaves
 * (w + 1/2) 2^-32, which is is_unit_open's value (exact there too). */
V_FN vd V_(is_simd_unit_open)(vi unit_bits) {
    return vd_of_bits(unit_bits) - 0x1.fffffffffffffp+19;
}

/* is_log. */
V_FN vd V_(is_simd_log)(vd x) {
    IS_LOG_CONSTANTS
    vi bits = vd_bits(x);
    vd m = vd_of_bits(vi_or(vi_and(bits, vi_set1(0x000FFFFFFFFFFFFFull)),
                            vi_set1(0x3FF0000000000000ull)));
    vm above = vd_gt(m, vd_set1(1.4142135623730951));
    m = vd_select(above, m * 0.5, m);
    /* (double)(exponent - 1023 + above): the exponent in the mantissa of 2^52, minus 2^52 + 1023,
     * then + 1 or + 0; small integers, so every step is exact (and a zero is +0, as (double)0). */
    vd dk = (vd_of_bits(vi_or(vi_srl(bits, 52), vi_set1(0x4330000000000000ull))) -
             4503599627371519.0) +
            vd_select(above, vd_set1(1.0), vd_set1(0.0));
    vd f = m - 1.0;
    vd s = f / (2.0 + f);
    vd z = s * s;
    vd w = z * z;
    vd t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    vd t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    vd r = t2 + t1;
    vd hfsq = 0.5 * f * f;
    return dk * ln2_hi - ((hfsq - (s * (hfsq + r) + dk * ln2_lo)) - f);
}

/* is_sincos_2pi for u = (w + 1/2) 2^-32 (is_unit_open's values); the quadrant rotation as a swap
 * (q odd) and sign flips (bit 1 of q for the sine, of q + 1 for the cosine), which is the scalar
 * code's table. The scalar q = (int)(t + 0.5) is computed as t rounded to the nearest integer
 * by adding and subtracting 1.5 * 2^52, which leaves q in the low bits of the sum: the same q,
 * because t + 0.5 is exact (t = (w + 1/2) 2^-30 has 33 significant bits and is below 4) and t is
 * never a half-integer (that would need w + 1/2 to be a multiple of 2^29), so no tie is rounded. */
V_FN void V_(is_simd_sincos_2pi)(vd u, vd *sin_out, vd *cos_out) {
    IS_SINCOS_CONSTANTS
    vd t = 4.0 * u;
    vd q_big = t + 6755399441055744.0; /* 1.5 * 2^52 + q; its low bits are q (0 <= q <= 4) */
    vi q = vd_bits(q_big);
    vd x = (t - (q_big - 6755399441055744.0)) * half_pi;
    vd z = x * x;
    vd v = z * x;
    vd rs = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    vd sin_x = x + v * (S1 + z * rs);
    vd rc = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    vd hz = 0.5 * z;
    vd w = 1.0 - hz;
    vd cos_x = w + (((1.0 - w) - hz) + z * rc);
    vm odd_quadrant = vi_bit0(q);
    vd s = vd_select(odd_quadrant, cos_x, sin_x);
    vd c = vd_select(odd_quadrant, sin_x, cos_x);
    *sin_out = vd_of_bits(vi_xor(vd_bits(s), vi_sll(vi_and(q, vi_set1(2)), 62)));
    *cos_out = vd_of_bits(vi_xor(vd_bits(c), vi_sll(vi_and(vi_add(q, vi_set1(1)), vi_set1(2)), 62)));
}

/* is_normal_quantile_central. */
V_FN vd V_(is_simd_quantile_central)(vd p) {
    vd q = p - 0.5;
    vd r = 0.180625 - q * q;
    return q *
           IS_AS241_CENTRAL_A(r) / IS_AS241_CENTRAL_B(r);
}

/* is_normal_quantile_tail. */
V_FN vd V_(is_simd_quantile_tail)(vd p, int far_tail) {
    vd q = p - 0.5;
    vm lower = vd_lt(q, vd_set1(0.0));
    vd tail_p = vd_select(lower, p, 1.0 - p);
    tail_p = vd_select(vd_lt(tail_p, vd_set1(0.075)), tail_p, vd_set1(0.075));
    vd rt = vd_sqrt(-V_(is_simd_log)(tail_p));
    vd r1 = rt - 1.6;
    vd tail =
        IS_AS241_TAIL_A(r1) / IS_AS241_TAIL_B(r1);
    if (far_tail) {
        vd r2 = rt - 5.0;
        vd far =
            IS_AS241_FAR_A(r2) / IS_AS241_FAR_B(r2);
        tail = vd_select(vd_le(rt, vd_set1(5.0)), tail, far);
    }
    return vd_select(lower, -tail, tail);
}

/* The lanes where is_normal_quantile_is_central is false, as bits. */
V_FN unsigned V_(is_simd_tail_lanes)(vd p) {
    vd q = p - 0.5;
    vd abs_q = vd_select(vd_lt(q, vd_set1(0.0)), -q, q);
    return ~vm_bits(vd_le(abs_q, vd_set1(0.425))) & V_ALL_LANES;
}

/* A vector of values into the output, rounded to float32 (as (float)x) or not; `stream` (the
 * output aligned to a vector) bypasses the caches, see is_simd_fill. */
V_FN void V_(is_simd_store)(void *out, int as_f64, int stream, is_u64 at, vd x) {
    if (as_f64) {
        if (stream) {
            vd_stream64((double *)out + at, x);
        } else {
            vd_store64((double *)out + at, x);
        }
    } else {
        if (stream) {
            vd_stream32((float *)out + at, x);
        } else {
            vd_store32((float *)out + at, x);
        }
    }
}

V_FN void V_(is_simd_step_uniform)(const V_(is_simd_stream) *st, const double *params,
                                    is_u64 block, void *out, int as_f64,
    int stream) {
    vw words[V_UNROLL];
    V_(is_simd_philox)(st, block, words);
    vd low = vd_set1(params[0]), width = vd_set1(params[1]);
    for (int j = 0; j < V_UNROLL; ++j) {
        vw s = words[j];
        vd first = low + width * V_(is_simd_unit_open)(vw_low_to_unit_bits(s));
        vd second = low + width * V_(is_simd_unit_open)(vw_high_to_unit_bits(s));
        V_(is_simd_store)(out, as_f64, stream, (is_u64)(2 * j) * V_LANES, first);
        V_(is_simd_store)(out, as_f64, stream, (is_u64)(2 * j + 1) * V_LANES, second);
    }
}

V_FN void V_(is_simd_step_normal)(const V_(is_simd_stream) *st, const double *params,
                                   is_u64 block, void *out, int as_f64,
    int stream) {
    vw words[V_UNROLL];
    V_(is_simd_philox)(st, block, words);
    vd mean = vd_set1(params[0]), std = vd_set1(params[1]);
    /* is_normal_pair on every (radius, angle) = (even, odd) word pair of the vectors, in phases
     * over all V_UNROLL vectors (every log, every sqrt, every sincos, then the values): the
     * divisions and square roots of independent vectors overlap instead of each waiting on the
     * chain before it (measured ~12% faster than one vector at a time). */
    vd radius[V_UNROLL], sin_a[V_UNROLL], cos_a[V_UNROLL];
#pragma GCC unroll 8
    for (int j = 0; j < V_UNROLL; ++j)
        radius[j] = -2.0 * V_(is_simd_log)(V_(is_simd_unit_open)(vw_even_to_unit_bits(words[j])));
#pragma GCC unroll 8
    for (int j = 0; j < V_UNROLL; ++j) radius[j] = vd_sqrt(radius[j]);
#pragma GCC unroll 8
    for (int j = 0; j < V_UNROLL; ++j)
        V_(is_simd_sincos_2pi)(V_(is_simd_unit_open)(vw_odd_to_unit_bits(words[j])), &sin_a[j], &cos_a[j]);
#pragma GCC unroll 8
    for (int j = 0; j < V_UNROLL; ++j) {
        vd even = mean + std * (radius[j] * cos_a[j]);
        vd odd = mean + std * (radius[j] * sin_a[j]);
        vd first, second;
        vd_interleave(even, odd, &first, &second);
        V_(is_simd_store)(out, as_f64, stream, (is_u64)(2 * j) * V_LANES, first);
        V_(is_simd_store)(out, as_f64, stream, (is_u64)(2 * j + 1) * V_LANES, second);
    }
}

V_FN void V_(is_simd_tail_pass)(double *tail_p, int n_tail, int far_tail) {
    for (int k = 0; k < n_tail; k += V_LANES) {
        vd_store64(tail_p + k, V_(is_simd_quantile_tail)(vd_load(tail_p + k), far_tail));
    }
}

V_FN void V_(is_simd_step_trunc_normal)(const V_(is_simd_stream) *st, const double *params,
                                         is_u64 block, void *out, int as_f64,
    int stream) {
    enum { n_values = 4 * V_TILE_BLOCKS };
    double z[n_values], p[n_values], tail_p[n_values + V_LANES];
    int tail_at[n_values];
    int n_tail = 0;
    vd p_low = vd_set1(params[4]), p_width = vd_set1(params[5]);
    for (int group = 0; group < V_TILE_BLOCKS; group += V_STEP_BLOCKS) {
        vw words[V_UNROLL];
        V_(is_simd_philox)(st, block + (is_u64)group, words);
        for (int half = 0; half < 2 * V_UNROLL; ++half) {
            vw s = words[half / 2];
            vi bits = half % 2 ? vw_high_to_unit_bits(s) : vw_low_to_unit_bits(s);
            vd p_v = p_low + p_width * V_(is_simd_unit_open)(bits); /* is_trunc_normal_p */
            int at = 4 * group + half * V_LANES;
            vd_store64(z + at, V_(is_simd_quantile_central)(p_v));
            unsigned tails = V_(is_simd_tail_lanes)(p_v);
            if (tails) {
                vd_store64(p + at, p_v);
                for (; tails; tails &= tails - 1) {
                    int lane = __builtin_ctz(tails);
                    tail_at[n_tail] = at + lane;
                    tail_p[n_tail++] = p[at + lane];
                }
            }
        }
    }
    /* The last vector of the tail pass is padded with a p whose value is then discarded. */
    for (int k = n_tail; k < n_tail + V_LANES; ++k) tail_p[k] = 0.01;
    if (params[7] != 0.0) { /* two specialisations, as in the scalar tile */
        V_(is_simd_tail_pass)(tail_p, n_tail, 1);
    } else {
        V_(is_simd_tail_pass)(tail_p, n_tail, 0);
    }
    for (int k = 0; k < n_tail; ++k) z[tail_at[k]] = tail_p[k];
    /* is_trunc_normal_finish: vd_max(low, x) is low > x ? low : x, i.e. x < low ? low : x. */
    vd mean = vd_set1(params[0]), std = vd_set1(params[1]), low = vd_set1(params[2]);
    vd high = vd_set1(params[3]), sign = vd_set1(params[6]);
    for (int i = 0; i < n_values; i += V_LANES) {
        vd x = mean + std * (sign * vd_load(z + i));
        V_(is_simd_store)(out, as_f64, stream, (is_u64)i, vd_min(high, vd_max(low, x)));
    }
}

V_FN void V_(is_simd_step)(const V_(is_simd_stream) *st, int dist, const double *params,
                            is_u64 block, void *out, int as_f64,
    int stream) {
    if (dist == IS_DIST_UNIFORM) {
        V_(is_simd_step_uniform)(st, params, block, out, as_f64, stream);
    } else if (dist == IS_DIST_NORMAL) {
        V_(is_simd_step_normal)(st, params, block, out, as_f64, stream);
    } else {
        V_(is_simd_step_trunc_normal)(st, params, block, out, as_f64, stream);
    }
}

/* Elements [start, start + count) of the stream into out, as is_fill. Whole steps from a block
 * boundary are written straight to the output; a partial one (the head or the tail of a run) is
 * computed whole into a scratch step and the part needed copied.
 *
 * A fill of at least IS_STREAM_BYTES is written with non-temporal stores: it is larger than this
 * core's share of the caches, so regular stores would first read every line from memory (the
 * read-for-ownership) only to overwrite it, doubling the traffic that bounds this loop. Smaller
 * fills (the service's chunks, which are sent as soon as they are made) stay in the cache.
 * Streaming stores need aligned addresses: when the run's elements can be (the output is
 * aligned to its element size and the run's start allows it), the head's partial steps stop at
 * the first element whose address is aligned, and every whole step after it streams. */
V_FN void V_(is_simd_fill)(int dist, const double *params, is_u64 seed, is_u32 name0,
                            is_u32 name1, is_u64 start, is_u64 count, void *out, int as_f64) {
    V_(is_simd_stream) st;
    V_(is_simd_stream_init)(&st, seed, name0, name1);
    is_u64 step_values = 4 * (is_u64)(dist == IS_DIST_TRUNC_NORMAL ? V_TILE_BLOCKS : V_STEP_BLOCKS);
    size_t value_size = as_f64 ? sizeof(double) : sizeof(float);
    int stream = count * value_size >= IS_STREAM_BYTES && (size_t)out % value_size == 0;
    /* Elements at aligned addresses: e = phase (mod align_values); a whole step starts at one
     * only if it also starts a block, i.e. if phase is a multiple of 4. */
    const is_u64 align_values = V_LANES * sizeof(double) / value_size;
    is_u64 phase = (start - (is_u64)((size_t)out / value_size)) & (align_values - 1);
    if (phase % 4 != 0) stream = 0;
    is_u64 end = start + count, element = start;
    while (element < end) {
        is_u64 block = element >> 2, offset = element & 3;
        char *target = (char *)out + (element - start) * value_size;
        if (offset == 0 && end - element >= step_values) {
            if (stream && ((size_t)target & (V_LANES * sizeof(double) - 1)) == 0) {
                V_(is_simd_step)(&st, dist, params, block, target, as_f64, 1);
            } else {
                V_(is_simd_step)(&st, dist, params, block, target, as_f64, 0);
            }
            element += step_values;
        } else {
            double part[4 * V_TILE_BLOCKS]; /* float32 values use the first half */
            is_u64 n = step_values - offset;
            if (n > end - element) n = end - element;
            is_u64 to_aligned = (phase - element) & (align_values - 1);
            if (stream && to_aligned != 0 && n > to_aligned) n = to_aligned;
            V_(is_simd_step)(&st, dist, params, block, part, as_f64, 0);
            memcpy(target, (char *)part + offset * value_size, n * value_size);
            element += n;
        }
    }
    if (stream) _mm_sfence(); /* non-temporal stores are weakly ordered: publish them */
}

#define V_ENTRY static __attribute__((noinline, target(V_TARGET)))

V_ENTRY void V_(is_simd_fill_runs_f64)(int dist, const double *params, is_u64 seed, is_u32 name0,
                                        is_u32 name1, const is_u64 *run_starts, is_u64 n_runs,
                                        is_u64 run_len, double *out) {
    for (is_u64 r = 0; r < n_runs; ++r)
        V_(is_simd_fill)(dist, params, seed, name0, name1, run_starts[r], run_len,
                         out + r * run_len, 1);
}

V_ENTRY void V_(is_simd_fill_runs_f32)(int dist, const double *params, is_u64 seed, is_u32 name0,
                                        is_u32 name1, const is_u64 *run_starts, is_u64 n_runs,
                                        is_u64 run_len, float *out) {
    for (is_u64 r = 0; r < n_runs; ++r)
        V_(is_simd_fill)(dist, params, seed, name0, name1, run_starts[r], run_len,
                         out + r * run_len, 0);
}

#undef V_FN
#undef V_ENTRY
#undef V_UNROLL
#undef V_STEP_BLOCKS
#undef V_TILE_BLOCKS
#undef V_ALL_LANES
#undef V_
#undef V_TARGET
#undef V_LANES
#undef V_BLOCKS
#undef vd
#undef vw
#undef vi
#undef vm
#undef vd_set1
#undef vd_sqrt
#undef vd_lt
#undef vd_gt
#undef vd_le
#undef vd_select
#undef vd_max
#undef vd_min
#undef vm_bits
#undef vd_bits
#undef vd_of_bits
#undef vd_load
#undef vd_store64
#undef vd_store32
#undef vd_stream64
#undef vd_stream32
#undef vi_set1
#undef vi_and
#undef vi_or
#undef vi_xor
#undef vi_add
#undef vi_srl
#undef vi_sll
#undef vi_bit0
#undef vw_pairs
#undef vw_block_index
#undef vw_add64
#undef vw_round_key
#undef vw_round_in
#undef vw_philox_round
#undef vw_philox_last_round
#undef vw_round_xor_
#undef vw_unit_high_
#undef vw_low_to_unit_bits
#undef vw_high_to_unit_bits
#undef vw_even_to_unit_bits
#undef vw_odd_to_unit_bits
#undef vd_interleave
