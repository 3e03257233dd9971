/*
 * simd_avx2.h -- the AVX2 vocabulary of simd_kernels.h: 256-bit vectors of 4 doubles, 8 Philox
 * words (2 blocks) or 4 64-bit integers. No FMA instruction is named (AVX2 CPUs have FMA3, but
 * the contract forbids fusing). Included by cpu_kernels.c right before simd_kernels.h, which
 * undefines every name below when it is done.
 */
#define V_(name) name##_avx2
#define V_TARGET "avx2"
#define V_LANES 4
#define V_BLOCKS 2

#define vd __m256d
#define vw __m256i
#define vi __m256i
#define vm __m256d         /* all-ones or all-zeros double lanes, as cmppd makes them */

#define vd_set1(x) _mm256_set1_pd(x)
#define vd_sqrt(x) _mm256_sqrt_pd(x)
#define vd_lt(a, b) _mm256_cmp_pd(a, b, _CMP_LT_OQ)
#define vd_gt(a, b) _mm256_cmp_pd(a, b, _CMP_GT_OQ)
#define vd_le(a, b) _mm256_cmp_pd(a, b, _CMP_LE_OQ)
#define vd_select(m, if_true, if_false) _mm256_blendv_pd(if_false, if_true, m)
#define vd_max(a, b) _mm256_max_pd(a, b)
#define vd_min(a, b) _mm256_min_pd(a, b)
#define vm_bits(m) ((unsigned)_mm256_movemask_pd(m))
#define vd_bits(x) _mm256_castpd_si256(x)
#define vd_of_bits(x) _mm256_castsi256_pd(x)
#define vd_load(p) _mm256_loadu_pd(p)
#define vd_store64(p, x) _mm256_storeu_pd(p, x)
#define vd_store32(p, x) _mm_storeu_ps(p, _mm256_cvtpd_ps(x))
/* Non-temporal, to an address aligned to the vector's width. */
#define vd_stream64(p, x) _mm256_stream_pd(p, x)
#define vd_stream32(p, x) _mm_stream_ps(p, _mm256_cvtpd_ps(x))

#define vi_set1(x) _mm256_set1_epi64x((long long)(x))
#define vi_and(a, b) _mm256_and_si256(a, b)
#define vi_or(a, b) _mm256_or_si256(a, b)
#define vi_xor(a, b) _mm256_xor_si256(a, b)
#define vi_add(a, b) _mm256_add_epi64(a, b)
#define vi_srl(a, n) _mm256_srli_epi64(a, n)
#define vi_sll(a, n) _mm256_slli_epi64(a, n)
#define vi_bit0(a)                                                                                 \
    _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(a, _mm256_set1_epi64x(1)),             \
                                           _mm256_set1_epi64x(1)))

#define vw_pairs(even_lane, odd_lane)                                                              \
    _mm256_set_epi64x((long long)(odd_lane), (long long)(even_lane), (long long)(odd_lane),        \
                      (long long)(even_lane))
#define vw_block_index() _mm256_set_epi64x(0, 1, 0, 0)
#define vw_add64(a, b) _mm256_add_epi64(a, b)
/* One Philox round of every block, in stream order: (lo0, hi0, lo1, hi1) = M0 c0, M1 c2 reversed
 * to (hi1, lo1, hi0, lo0), xor (c1, 0, c3, 0) and the key (k0, 0, k1, 0):
 * (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), as is_philox4x32_10. (AVX-512's three-instruction
 * form needs a masked xor; with a blend instead it measured slower here.) */
#define vw_round_key(k0, k1) vw_pairs(k0, k1)
#define vw_round_in(a) (a)
#define vw_philox_round(a, multipliers, key)                                                       \
    _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(_mm256_mul_epu32(a, multipliers), 0x1B), \
                                      _mm256_srli_epi64(a, 32)),                                   \
                     key)
#define vw_philox_last_round(a, multipliers, key) vw_philox_round(a, multipliers, key)
/* Words w into 64-bit lanes under the high word 0x41300000, as the doubles 2^20 + w 2^-32 (see
 * is_simd_unit_open): the first or second half of the vector, the even or the odd words. */
#define vw_unit_high_ _mm256_set1_epi64x(0x4130000000000000ll)
#define vw_low_to_unit_bits(a)                                                                     \
    _mm256_or_si256(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(a)), vw_unit_high_)
#define vw_high_to_unit_bits(a)                                                                    \
    _mm256_or_si256(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(a, 1)), vw_unit_high_)
#define vw_even_to_unit_bits(a) _mm256_blend_epi32(a, vw_unit_high_, 0xAA)
#define vw_odd_to_unit_bits(a) _mm256_or_si256(_mm256_srli_epi64(a, 32), vw_unit_high_)
#define vd_interleave(even, odd, first, second)                                                    \
    do {                                                                                           \
        __m256d lo_ = _mm256_unpacklo_pd(even, odd), hi_ = _mm256_unpackhi_pd(even, odd);         \
        *(first) = _mm256_permute2f128_pd(lo_, hi_, 0x20);                                         \
        *(second) = _mm256_permute2f128_pd(lo_, hi_, 0x31);                                        \
    } while (0)
