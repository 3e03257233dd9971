/*
 * initserve_math.h -- the one definition of initserve's random bits and of the arithmetic that
 * turns them into floats. It is compiled twice: by the host C compiler for the CPU backend
 * (cpu_kernels.c) and by NVRTC/nvcc for the GPU backend (gpu_kernels.cu). docs/ALGORITHM.md is
 * the prose version of this file; the two must agree.
 *
 * Rules that make the bytes identical on every CPU and GPU:
 *   - only IEEE-754 binary64 +, -, *, / and sqrt, each correctly rounded, in the order written;
 *   - compiled without contraction into fused multiply-add (gcc -ffp-contract=off,
 *     nvcc --fmad=false) and without fast-math;
 *   - no libm or vendor transcendentals: log, sin, cos, exp and the normal quantile below are
 *     fixed polynomial / rational approximations built from those operations;
 *   - branches only choose between values that were both computed the same way, so a
 *     compiler that turns them into selects (or a GPU that diverges) cannot change a bit.
 */
#ifndef INITSERVE_MATH_H
#define INITSERVE_MATH_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IS_FN __device__ __forceinline__
#define IS_SQRT(x) sqrt(x)
#else
#define IS_FN static inline
#define IS_SQRT(x) __builtin_sqrt(x)
#endif

typedef unsigned int is_u32;
typedef unsigned long long is_u64;
typedef long long is_i64;

/* ---------------------------------------------------------------------------------------------
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11). Known-answer vectors:
 * tests/reference/philox4x32-10.kat and docs/ALGORITHM.md, appendix A.11.
 */
#define IS_PHILOX_M0 0xD2511F53u
#define IS_PHILOX_M1 0xCD9E8D57u
#define IS_PHILOX_W0 0x9E3779B9u /* golden ratio */
#define IS_PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */

IS_FN void is_philox4x32_10(is_u32 ctr[4], is_u32 k0, is_u32 k1) {
    is_u32 c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    for (int round = 0; round < 10; ++round) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
        is_u32 hi0 = __umulhi(IS_PHILOX_M0, c0), lo0 = IS_PHILOX_M0 * c0;
        is_u32 hi1 = __umulhi(IS_PHILOX_M1, c2), lo1 = IS_PHILOX_M1 * c2;
#else
        is_u64 p0 = (is_u64)IS_PHILOX_M0 * c0;
        is_u64 p1 = (is_u64)IS_PHILOX_M1 * c2;
        is_u32 hi0 = (is_u32)(p0 >> 32), lo0 = (is_u32)p0;
        is_u32 hi1 = (is_u32)(p1 >> 32), lo1 = (is_u32)p1;
#endif
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += IS_PHILOX_W0;
        k1 += IS_PHILOX_W1;
    }
    ctr[0] = c0; ctr[1] = c1; ctr[2] = c2; ctr[3] = c3;
}

/* Stream layout: key = the 64-bit seed (k0 = low word), counter = (block_lo, block_hi, name0,
 * name1) where (name0, name1) are the first 8 bytes (little-endian words) of SHA-256 of the UTF-8
 * tensor key. Word j of block b is the 32-bit word 4*b + j of the tensor's stream. */
IS_FN void is_stream_block(is_u64 block, is_u32 seed_lo, is_u32 seed_hi, is_u32 name0,
                           is_u32 name1, is_u32 out[4]) {
    out[0] = (is_u32)block;
    out[1] = (is_u32)(block >> 32);
    out[2] = name0;
    out[3] = name1;
    is_philox4x32_10(out, seed_lo, seed_hi);
}

/* ---------------------------------------------------------------------------------------------
 * Bits to floats. */

IS_FN is_u64 is_bits_of(double x) {
    union { double d; is_u64 u; } pun;
    pun.d = x;
    return pun.u;
}

IS_FN double is_double_of(is_u64 u) {
    union { double d; is_u64 u; } pun;
    pun.u = u;
    return pun.d;
}

/* (w + 1/2) / 2^32: uniform on the open interval (0, 1), never 0 or 1, exact in binary64.
 * Written through a signed conversion because packed int32 -> double exists on every SIMD ISA. */
IS_FN double is_unit_open(is_u32 w) {
    return ((double)(int)(w ^ 0x80000000u) + 2147483648.5) * 2.3283064365386962890625e-10;
}

/* The constants of is_log (fdlibm's e_log.c: ln2 split in two, the Lg minimax coefficients) and of
 * is_sincos_2pi (pi/2, fdlibm's __kernel_sin S and __kernel_cos C coefficients), written once:
 * the scalar functions below and the vector kernels (simd_kernels.h) declare them by these. */
#define IS_LOG_CONSTANTS \
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10; \
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01; \
    const double Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01; \
    const double Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01; \
    const double Lg7 = 1.479819860511658591e-01;
#define IS_SINCOS_CONSTANTS \
    const double half_pi = 1.57079632679489655800e+00; \
    const double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03; \
    const double S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06; \
    const double S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10; \
    const double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03; \
    const double C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07; \
    const double C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;

/* Natural log for positive normal finite x: fdlibm's e_log.c reduction and minimax polynomial
 * (x = 2^k * (1 + f), sqrt(2)/2 <= 1 + f < sqrt(2), log(1+f) = f - hfsq + s*(hfsq + R(s^2))). */
IS_FN double is_log(double x) {
    IS_LOG_CONSTANTS
    is_u64 bits = is_bits_of(x);
    int k = (int)(bits >> 52) - 1023;
    double m = is_double_of((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull); /* [1, 2) */
    int above = m > 1.4142135623730951; /* sqrt(2) */
    m = above ? m * 0.5 : m;                  /* exact */
    k = k + above;
    double f = m - 1.0;                       /* exact (Sterbenz) */
    double s = f / (2.0 + f);
    double z = s * s;
    double w = z * z;
    double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    double r = t2 + t1;
    double hfsq = 0.5 * f * f;
    double dk = (double)k;
    return dk * ln2_hi - ((hfsq - (s * (hfsq + r) + dk * ln2_lo)) - f);
}

/* exp(x) for -700 <= x <= 0: fdlibm's e_exp.c (x = k ln2 + r, |r| <= ln2/2, Remez polynomial for
 * r*(e^r+1)/(e^r-1)). Used only for per-tensor constants (the truncated normal's CDF bounds). */
IS_FN double is_exp(double x) {
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const double inv_ln2 = 1.44269504088896338700e+00;
    const double P1 = 1.66666666666666019037e-01, P2 = -2.77777777770155933842e-03;
    const double P3 = 6.61375632143793436117e-05, P4 = -1.65339022054652515390e-06;
    const double P5 = 4.13813679705723846039e-08;
    double kd = x * inv_ln2;
    int k = (int)(kd < 0.0 ? kd - 0.5 : kd + 0.5);
    double hi = x - (double)k * ln2_hi;
    double lo = (double)k * ln2_lo;
    double r = hi - lo;
    double t = r * r;
    double c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
    double y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
    /* 2^k in two exact steps so that k down to -1074 stays representable. */
    int k1 = k / 2, k2 = k - k1;
    return y * is_double_of((is_u64)(k1 + 1023) << 52) * is_double_of((is_u64)(k2 + 1023) << 52);
}

/* sin(2 pi u) and cos(2 pi u) for 0 <= u <= 1. The reduction is exact on u itself
 * (t = 4u, q = round(t), r = t - q in [-1/2, 1/2]); x = r * pi/2 in [-pi/4, pi/4] then goes through
 * fdlibm's __kernel_sin / __kernel_cos polynomials, and the quadrant q mod 4 rotates the pair. */
IS_FN void is_sincos_2pi(double u, double *sin_out, double *cos_out) {
    IS_SINCOS_CONSTANTS
    double t = 4.0 * u;
    int q = (int)(t + 0.5);
    double x = (t - (double)q) * half_pi;
    double z = x * x;
    double v = z * x;
    double rs = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    double sin_x = x + v * (S1 + z * rs);
    double rc = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    double hz = 0.5 * z;
    double w = 1.0 - hz;
    double cos_x = w + (((1.0 - w) - hz) + z * rc);
    int quadrant = q & 3;
    double s = quadrant == 0 ? sin_x : quadrant == 1 ? cos_x : quadrant == 2 ? -sin_x : -cos_x;
    double c = quadrant == 0 ? cos_x : quadrant == 1 ? -sin_x : quadrant == 2 ? -cos_x : sin_x;
    *sin_out = s;
    *cos_out = c;
}

/* AS241's rational approximations, each A(r) / B(r), written once: the scalar kernels, the
 * vector kernels (GCC vector types broadcast a double operand) and CUDA expand the same
 * expressions, so the same operations in the same order. The central one is used as
 * q * A(r) / B(r), that is (q * A(r)) / B(r), as in section 4 of docs/ALGORITHM.md. */
#define IS_AS241_CENTRAL_A(r) \
    (((((((2.5090809287301226727e+3 * (r) + 3.3430575583588128105e+4) * (r) + \
    6.7265770927008700853e+4) * (r) + 4.5921953931549871457e+4) * (r) + \
    1.3731693765509461125e+4) * (r) + 1.9715909503065514427e+3) * (r) + \
    1.3314166789178437745e+2) * (r) + 3.3871328727963666080e+0)
#define IS_AS241_CENTRAL_B(r) \
    (((((((5.2264952788528545610e+3 * (r) + 2.8729085735721942674e+4) * (r) + \
    3.9307895800092710610e+4) * (r) + 2.1213794301586595867e+4) * (r) + \
    5.3941960214247511077e+3) * (r) + 6.8718700749205790830e+2) * (r) + \
    4.2313330701600911252e+1) * (r) + 1.0)
#define IS_AS241_TAIL_A(r1) \
    (((((((7.74545014278341407640e-4 * (r1) + 2.27238449892691845833e-2) * (r1) + \
    2.41780725177450611770e-1) * (r1) + 1.27045825245236838258e+0) * (r1) + \
    3.64784832476320460504e+0) * (r1) + 5.76949722146069140550e+0) * (r1) + \
    4.63033784615654529590e+0) * (r1) + 1.42343711074968357734e+0)
#define IS_AS241_TAIL_B(r1) \
    (((((((1.05075007164441684324e-9 * (r1) + 5.47593808499534494600e-4) * (r1) + \
    1.51986665636164571966e-2) * (r1) + 1.48103976427480074590e-1) * (r1) + \
    6.89767334985100004550e-1) * (r1) + 1.67638483018380384940e+0) * (r1) + \
    2.05319162663775882187e+0) * (r1) + 1.0)
#define IS_AS241_FAR_A(r2) \
    (((((((2.01033439929228813265e-7 * (r2) + 2.71155556874348757815e-5) * (r2) + \
    1.24266094738807843860e-3) * (r2) + 2.65321895265761230930e-2) * (r2) + \
    2.96560571828504891230e-1) * (r2) + 1.78482653991729133580e+0) * (r2) + \
    5.46378491116411436990e+0) * (r2) + 6.65790464350110377720e+0)
#define IS_AS241_FAR_B(r2) \
    (((((((2.04426310338993978564e-15 * (r2) + 1.42151175831644588870e-7) * (r2) + \
    1.84631831751005468180e-5) * (r2) + 7.86869131145613259100e-4) * (r2) + \
    1.48753612908506148525e-2) * (r2) + 1.36929880922735805310e-1) * (r2) + \
    5.99832206555887937690e-1) * (r2) + 1.0)

/* Standard normal quantile: Wichura's AS241 (PPND16, Applied Statistics 37(3), 1988), relative
 * accuracy about 1e-16. All three rational approximations are evaluated and one is selected,
 * so the result does not depend on how a compiler or GPU treats the branches. 0 < p < 1.
 * far_tail = 0 skips the third approximation (min(p, 1 - p) < exp(-25)); the caller passes it
 * only when no p it can produce is that small, so the value is the same either way. */
/* The central approximation, used where |p - 1/2| <= 0.425. */
IS_FN double is_normal_quantile_central(double p) {
    double q = p - 0.5;
    double r = 0.180625 - q * q;
    return q *
           IS_AS241_CENTRAL_A(r) / IS_AS241_CENTRAL_B(r);
}

/* The two tail approximations, used where |p - 1/2| > 0.425. */
IS_FN double is_normal_quantile_tail(double p, int far_tail) {
    double q = p - 0.5;
    double tail_p = q < 0.0 ? p : 1.0 - p;
    /* In the central region tail_p >= 0.075; clamp so the unused tail branch never sees p <= 0. */
    tail_p = tail_p < 0.075 ? tail_p : 0.075;
    double rt = IS_SQRT(-is_log(tail_p));
    double r1 = rt - 1.6;
    double tail =
        IS_AS241_TAIL_A(r1) / IS_AS241_TAIL_B(r1);
    if (far_tail) {
        double r2 = rt - 5.0;
        double far =
            IS_AS241_FAR_A(r2) / IS_AS241_FAR_B(r2);
        tail = rt <= 5.0 ? tail : far;
    }
    return q < 0.0 ? -tail : tail;
}

IS_FN int is_normal_quantile_is_central(double p) {
    double q = p - 0.5;
    double abs_q = q < 0.0 ? -q : q;
    return abs_q <= 0.425;
}

IS_FN double is_normal_quantile_ex(double p, int far_tail) {
    double central = is_normal_quantile_central(p);
    double tail = is_normal_quantile_tail(p, far_tail);
    return is_normal_quantile_is_central(p) ? central : tail;
}

IS_FN double is_normal_quantile(double p) { return is_normal_quantile_ex(p, 1); }

/* Standard normal CDF Phi(x) for x <= 0 (the lower tail, where it is accurate to a few ulp in
 * relative terms). Per-tensor constants only. For x > -3 the Taylor series of the integral about 0
 * (60 terms); below, phi(x) times the Laplace continued fraction of Mills' ratio, 200 terms,
 * evaluated from the inside out. Below -37 the value is under 6e-302 and is returned as 0, which
 * keeps exp's argument and result normal. */
IS_FN double is_normal_lower_tail(double x) {
    const double inv_sqrt_2pi = 3.98942280401432702863e-01;
    if (x < -37.0) return 0.0;
    if (x > -3.0) {
        double term = x, sum = x, x2 = x * x;
        for (int n = 1; n <= 60; ++n) {
            term = term * (-x2) / (2.0 * (double)n);
            sum = sum + term / (2.0 * (double)n + 1.0);
        }
        return 0.5 + inv_sqrt_2pi * sum;
    }
    double t = -x;
    double frac = t;
    for (int k = 200; k >= 1; --k) {
        frac = t + (double)k / frac;
    }
    return inv_sqrt_2pi * is_exp(-0.5 * x * x) / frac;
}

/* ---------------------------------------------------------------------------------------------
 * The distributions. Each turns the words of one block into four values; element i of a tensor
 * is value (i mod 4) of block floor(i / 4). */

enum { IS_DIST_UNIFORM = 0, IS_DIST_NORMAL = 1, IS_DIST_TRUNC_NORMAL = 2, IS_DIST_RAW_WORDS = 3 };

/* params: UNIFORM (low, width): low + width * u.
 *         NORMAL (mean, std): Box-Muller on word pairs (0,1) and (2,3) of a block, the first word
 *           of a pair giving the radius, the second the angle; the cosine branch goes to the even
 *           element, the sine branch to the odd one.
 *         TRUNC_NORMAL (mean, std, low, high, p_low, p_width, sign, far_tail): inverse CDF,
 *           z = sign * quantile(p_low + p_width * u), value = clamp(mean + std * z, low, high);
 *           far_tail (0 or 1) is computed by the host from the range of p (see plan/schemes). */
IS_FN double is_uniform_value(const double *params, is_u32 word) {
    return params[0] + params[1] * is_unit_open(word);
}

IS_FN void is_normal_pair(const double *params, is_u32 radius_word, is_u32 angle_word,
                          double *even, double *odd) {
    double radius = IS_SQRT(-2.0 * is_log(is_unit_open(radius_word)));
    double s, c;
    is_sincos_2pi(is_unit_open(angle_word), &s, &c);
    *even = params[0] + params[1] * (radius * c);
    *odd = params[0] + params[1] * (radius * s);
}

IS_FN double is_trunc_normal_p(const double *params, is_u32 word) {
    return params[4] + params[5] * is_unit_open(word);
}

IS_FN double is_trunc_normal_finish(const double *params, double z) {
    double x = params[0] + params[1] * (params[6] * z);
    x = x < params[2] ? params[2] : x;
    return x > params[3] ? params[3] : x;
}

IS_FN double is_trunc_normal_value(const double *params, is_u32 word, int far_tail) {
    return is_trunc_normal_finish(params, is_normal_quantile_ex(is_trunc_normal_p(params, word), far_tail));
}

IS_FN void is_block_values(int dist, const double *params, const is_u32 words[4], double out[4]) {
    if (dist == IS_DIST_UNIFORM) {
        for (int j = 0; j < 4; ++j) out[j] = is_uniform_value(params, words[j]);
    } else if (dist == IS_DIST_NORMAL) {
        is_normal_pair(params, words[0], words[1], &out[0], &out[1]);
        is_normal_pair(params, words[2], words[3], &out[2], &out[3]);
    } else if (dist == IS_DIST_TRUNC_NORMAL) {
        for (int j = 0; j < 4; ++j) out[j] = is_trunc_normal_value(params, words[j], params[7] != 0.0);
    } else {
        for (int j = 0; j < 4; ++j) out[j] = (double)words[j];
    }
}

#endif /* INITSERVE_MATH_H */
