/*
 * simd_avx512.h -- the AVX-512F vocabulary of simd_kernels.h: 512-bit vectors of 8 doubles,
 * 16 Philox words (4 blocks) or 8 64-bit integers. Only AVX-512F instructions are named, so the
 * path runs on every AVX-512 CPU (Skylake-X onwards, Zen 4). Included by cpu_kernels.c right
 * before simd_kernels.h, which undefines every name below when it is done.
 */
#define V_(name) name##_avx512
#define V_TARGET "avx512f"
#define V_LANES 8          /* doubles in a vd */
#define V_BLOCKS 4         /* Philox blocks in a vw (16 words) */

#define vd __m512d
#define vw __m512i         /* 32-bit words, four per 128-bit lane: one Philox block */
#define vi __m512i         /* 64-bit integers, one per double lane */
#define vm __mmask8        /* one bit per double lane */

#define vd_set1(x) _mm512_set1_pd(x)
#define vd_sqrt(x) _mm512_sqrt_pd(x)
#define vd_lt(a, b) _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ)
#define vd_gt(a, b) _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ)
#define vd_le(a, b) _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ)
#define vd_select(m, if_true, if_false) _mm512_mask_blend_pd(m, if_false, if_true)
/* maxpd(a, b) is a > b ? a : b and minpd(a, b) is a < b ? a : b, whatever the signs of zeros. */
#define vd_max(a, b) _mm512_max_pd(a, b)
#define vd_min(a, b) _mm512_min_pd(a, b)
#define vm_bits(m) ((unsigned)(m))
#define vd_bits(x) _mm512_castpd_si512(x)
#define vd_of_bits(x) _mm512_castsi512_pd(x)
#define vd_load(p) _mm512_loadu_pd(p)
#define vd_store64(p, x) _mm512_storeu_pd(p, x)
#define vd_store32(p, x) _mm256_storeu_ps(p, _mm512_cvtpd_ps(x))
/* Non-temporal, to an address aligned to the vector's width. */
#define vd_stream64(p, x) _mm512_stream_pd(p, x)
#define vd_stream32(p, x) _mm256_stream_ps(p, _mm512_cvtpd_ps(x))

#define vi_set1(x) _mm512_set1_epi64((long long)(x))
#define vi_and(a, b) _mm512_and_si512(a, b)
#define vi_or(a, b) _mm512_or_si512(a, b)
#define vi_xor(a, b) _mm512_xor_si512(a, b)
#define vi_add(a, b) _mm512_add_epi64(a, b)
#define vi_srl(a, n) _mm512_srli_epi64(a, n)
#define vi_sll(a, n) _mm512_slli_epi64(a, n)
#define vi_bit0(a) _mm512_test_epi64_mask(a, _mm512_set1_epi64(1))

/* 64-bit lanes alternating (even_lane, odd_lane): a word pair (w0, w1) and a pair (w2, w3). */
#define vw_pairs(even_lane, odd_lane)                                                              \
    _mm512_set_epi64((long long)(odd_lane), (long long)(even_lane), (long long)(odd_lane),         \
                     (long long)(even_lane), (long long)(odd_lane), (long long)(even_lane),        \
                     (long long)(odd_lane), (long long)(even_lane))
/* Block i of the vector: 64-bit lane 2i holds i, lane 2i + 1 holds 0. */
#define vw_block_index() _mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0)
#define vw_add64(a, b) _mm512_add_epi64(a, b)
/* One Philox round of every block (is_philox4x32_10 maps (c0, c1, c2, c3) to
 * (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), where (lo0, hi0) = M0 c0 and (lo1, hi1) = M1 c2), in
 * three instructions: between rounds a block is kept as (c0, c3, c2, c1) (vw_round_in). vpmuludq
 * reads only words 0 and 2, so its product (lo0, hi0, lo1, hi1) lines up c3 under hi0 and c1
 * under hi1, and one vpternlogd masked to the odd words xors them and the key (0, k1, 0, k0) in:
 * (lo0, hi0 ^ c3 ^ k1, lo1, hi1 ^ c1 ^ k0) = (c3', c2', c1', c0'), which a rotation of the words
 * makes (c0', c3', c2', c1') for the next round, or a reversal (c0', c1', c2', c3') after the last. */
#define vw_round_key(k0, k1) vw_pairs((is_u64)(k1) << 32, (is_u64)(k0) << 32)
#define vw_round_in(a) _mm512_shuffle_epi32(a, (_MM_PERM_ENUM)0x6C) /* (w0, w3, w2, w1) */
#define vw_round_xor_(a, multipliers, key)                                                         \
    _mm512_mask_ternarylogic_epi32(_mm512_mul_epu32(a, multipliers), 0xAAAA, a, key, 0x96)
#define vw_philox_round(a, multipliers, key)                                                       \
    _mm512_shuffle_epi32(vw_round_xor_(a, multipliers, key), (_MM_PERM_ENUM)0x93)
#define vw_philox_last_round(a, multipliers, key)                                                  \
    _mm512_shuffle_epi32(vw_round_xor_(a, multipliers, key), (_MM_PERM_ENUM)0x1B)
/* Words w into 64-bit lanes under the high word 0x41300000, as the doubles 2^20 + w 2^-32 (see
 * is_simd_unit_open): the first or second half of the vector, or the even or odd words (the
 * radius and the angle word of each Box-Muller pair). One instruction each. */
#define vw_unit_high_ _mm512_set1_epi64(0x4130000000000000ll)
#define vw_low_to_unit_bits(a)                                                                     \
    _mm512_permutex2var_epi32(a, _mm512_set_epi32(17, 7, 17, 6, 17, 5, 17, 4, 17, 3, 17, 2, 17, 1, \
                                                  17, 0),                                          \
                              vw_unit_high_)
#define vw_high_to_unit_bits(a)                                                                    \
    _mm512_permutex2var_epi32(a, _mm512_set_epi32(17, 15, 17, 14, 17, 13, 17, 12, 17, 11, 17, 10,  \
                                                  17, 9, 17, 8),                                   \
                              vw_unit_high_)
#define vw_even_to_unit_bits(a) _mm512_mask_blend_epi32(0xAAAA, a, vw_unit_high_)
#define vw_odd_to_unit_bits(a)                                                                     \
    _mm512_permutex2var_epi32(a, _mm512_set_epi32(17, 15, 17, 13, 17, 11, 17, 9, 17, 7, 17, 5, 17, \
                                                  3, 17, 1),                                       \
                              vw_unit_high_)
/* (e0..e7), (o0..o7) -> (e0, o0, ..., e3, o3), (e4, o4, ..., e7, o7). */
#define vd_interleave(even, odd, first, second)                                                    \
    do {                                                                                           \
        *(first) = _mm512_permutex2var_pd(even, _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), odd);  \
        *(second) = _mm512_permutex2var_pd(even, _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4), odd); \
    } while (0)
