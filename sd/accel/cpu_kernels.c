/* CPU kernels for MLX's Linux CPU backend, where transcendental element-wise ops run scalar on one thread
 * and attention is composed of separate matmul / softmax / matmul ops (see sd/accel/cpu_kernels.py).
 *
 * fp32 only. Loops are OpenMP-parallel and written for gcc -O3 auto-vectorisation: exp2 and erf are
 * polynomials in plain arithmetic (no libm in hot loops), reductions use `omp simd reduction` (legal to
 * vectorise without -ffast-math). Coefficients were fitted by Chebyshev interpolation in double precision
 * (numpy + mpmath) on the stated intervals; errors measured in fp32.
 * Attention's GEMMs go to the BLAS that sd/runtime/blas.py loaded (cblas_sgemm handed over by sdk_set_blas).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LOG2E 1.44269504088896341f

/* ------------------------------------------------------------------------------------------ maths */

/* 2^x, relative error ~1e-7; x is clamped to [-126, 127] (results below 2^-126 are not needed here). */
static inline float exp2_poly(float x) {
    x = x < -126.0f ? -126.0f : x;
    x = x > 127.0f ? 127.0f : x;
    const float magic = 12582912.0f;            /* 1.5 * 2^23: adding it rounds to the nearest integer */
    float n = (x + magic) - magic;
    float f = x - n;                             /* exact, in [-0.5, 0.5] */
    float p = 1.546973217e-04f;                  /* 2^f on [-0.5, 0.5], degree 6 */
    p = p * f + 1.340043265e-03f;
    p = p * f + 9.618025273e-03f;
    p = p * f + 5.550327152e-02f;
    p = p * f + 2.402265072e-01f;
    p = p * f + 6.931471825e-01f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;     /* 2^n built in the exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* e^x, relative error ~1e-7: x = n ln2 + r with ln2 in two parts (Cody-Waite: n * ln2's high part is
 * exact), e^r polynomial on [-ln2/2, ln2/2]; x clamped to [-87.3, 88] (saturates instead of overflowing). */
static inline float exp_poly(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f;
    float n = (x * LOG2E + magic) - magic;
    float r = (x - n * 6.931457520e-01f) - n * 1.428606820e-06f;
    float p = 1.394858118e-03f;                  /* e^r, degree 6 */
    p = p * r + 8.375128731e-03f;
    p = p * r + 4.166621715e-02f;
    p = p * r + 1.666641533e-01f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* erf(x), absolute error ~1e-7: x * P(x^2) below 1, 1 - exp(-x^2) * R(|x|) above (erfc's smooth factor),
 * 1 from 3.92 on (erfc(3.92) < 3e-8, below fp32's resolution at 1). */
static inline float erf_poly(float x) {
    float a = fabsf(x);
    float s = a * a;
    float small = -5.654105917e-04f;             /* erf(a)/a as a polynomial in a^2 on [0, 1], degree 5 */
    small = small * s + 4.923277535e-03f;
    small = small * s - 2.671638504e-02f;
    small = small * s + 1.128036454e-01f;
    small = small * s - 3.761234879e-01f;
    small = small * s + 1.128379107e+00f;
    small *= a;
    float c = a > 3.92f ? 3.92f : a;
    float r = 1.814567440e-06f;                  /* erfc(c) * exp(c^2) on [1, 3.93], degree 10 */
    r = r * c - 5.161910303e-05f;
    r = r * c + 6.647501723e-04f;
    r = r * c - 5.137167405e-03f;
    r = r * c + 2.664821595e-02f;
    r = r * c - 9.845719486e-02f;
    r = r * c + 2.687470913e-01f;
    r = r * c - 5.556526780e-01f;
    r = r * c + 8.846938014e-01f;
    r = r * c - 1.087141514e+00f;
    r = r * c + 9.932680130e-01f;
    float large = 1.0f - exp_poly(-(c * c)) * r;
    large = a >= 3.92f ? 1.0f : large;
    return copysignf(a < 1.0f ? small : large, x);
}

static inline float silu(float y) { return y / (1.0f + exp_poly(-y)); }

/* Exact (erf) GELU, as mlx.nn.gelu: 0.5 x (1 + erf(x / sqrt 2)). */
static inline float gelu(float x) { return 0.5f * x * (1.0f + erf_poly(x * 0.70710678118654752f)); }

/* Element-wise entry points, used by the tests to check the approximations over many inputs. */
void sdk_exp(const float *x, float *y, long n) {
    #pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++) y[i] = exp_poly(x[i]);
}

void sdk_erf(const float *x, float *y, long n) {
    #pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++) y[i] = erf_poly(x[i]);
}

void sdk_silu(const float *x, float *y, long n) {
    #pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++) y[i] = silu(x[i]);
}

/* --------------------------------------------------------------------------------------------- GEGLU */

/* x [n, 2f] (value | gate, as mx.split(proj(x), 2, axis=-1) gives) -> y [n, f] = value * gelu(gate). */
void sdk_geglu(const float *x, float *y, long n, long f) {
    #pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        const float *value = x + i * 2 * f, *gate = value + f;
        float *out = y + i * f;
        #pragma omp simd
        for (long j = 0; j < f; j++) out[j] = value[j] * gelu(gate[j]);
    }
}

/* ----------------------------------------------------------------------------------------- GroupNorm */

#define GN_CHUNKS 32   /* pixel chunks per image for the statistics: fixed, so results do not depend on
                          the thread count */

/* x, y [b, p, c] channels-last; g groups over c; gamma/beta [c]. y = (x - mean) / sqrt(var + eps) * gamma
 * + beta, then x * sigmoid(x) when `with_silu`. Statistics in double, about a per-channel shift (the
 * channel's first pixel), so a large mean does not cancel the variance. Returns 0, or -1 out of memory. */
int sdk_group_norm(const float *x, float *y, long b, long p, long c, long g, const float *gamma,
                   const float *beta, float eps, int with_silu) {
    long chunks = p < GN_CHUNKS ? p : GN_CHUNKS;
    long cpg = c / g;
    double *part = malloc(sizeof(double) * 2 * c * chunks * b);
    float *scale = malloc(sizeof(float) * c * b), *mean_c = malloc(sizeof(float) * c * b);
    if (!part || !scale || !mean_c) {
        free(part); free(scale); free(mean_c);
        return -1;
    }
    /* pass 1: per (image, chunk, channel) sums of d and d^2, d = x - x[first pixel] */
    #pragma omp parallel for schedule(dynamic, 1)
    for (long t = 0; t < b * chunks; t++) {
        long bi = t / chunks, ch = t % chunks;
        long p0 = p * ch / chunks, p1 = p * (ch + 1) / chunks;
        const float *img = x + bi * p * c;
        double *s1 = part + t * 2 * c, *s2 = s1 + c;
        for (long k = 0; k < c; k++) s1[k] = s2[k] = 0.0;
        for (long px = p0; px < p1; px++) {
            const float *row = img + px * c;
            #pragma omp simd
            for (long k = 0; k < c; k++) {
                double d = (double)row[k] - (double)img[k];
                s1[k] += d;
                s2[k] += d * d;
            }
        }
    }
    /* per group: channel means and centred sums of squares, combined (Chan et al.) into the group's */
    for (long bi = 0; bi < b; bi++) {
        const float *img = x + bi * p * c;
        for (long gi = 0; gi < g; gi++) {
            double m_c[cpg], m2_c[cpg], mean = 0.0, m2 = 0.0;
            for (long j = 0; j < cpg; j++) {
                long k = gi * cpg + j;
                double s1 = 0.0, s2 = 0.0;
                for (long ch = 0; ch < chunks; ch++) {
                    s1 += part[(bi * chunks + ch) * 2 * c + k];
                    s2 += part[(bi * chunks + ch) * 2 * c + c + k];
                }
                m_c[j] = (double)img[k] + s1 / p;
                m2_c[j] = s2 - s1 * (s1 / p);
                mean += m_c[j];
            }
            mean /= cpg;
            for (long j = 0; j < cpg; j++) m2 += m2_c[j] + p * (m_c[j] - mean) * (m_c[j] - mean);
            double var = m2 / (double)(p * cpg);
            double inv = 1.0 / sqrt((var > 0.0 ? var : 0.0) + eps);
            for (long j = 0; j < cpg; j++) {
                long k = gi * cpg + j;
                scale[bi * c + k] = (float)(inv * gamma[k]);
                mean_c[bi * c + k] = (float)mean;
            }
        }
    }
    /* pass 2: normalise (subtract first: no cancellation between x * scale and the shift), +SiLU */
    long rows = b * p, block = 64;
    #pragma omp parallel for schedule(static)
    for (long r0 = 0; r0 < rows; r0 += block) {
        long r1 = r0 + block < rows ? r0 + block : rows;
        for (long r = r0; r < r1; r++) {
            const float *in = x + r * c, *sc = scale + (r / p) * c, *mu = mean_c + (r / p) * c;
            float *out = y + r * c;
            if (with_silu) {
                #pragma omp simd
                for (long k = 0; k < c; k++) out[k] = silu((in[k] - mu[k]) * sc[k] + beta[k]);
            } else {
                #pragma omp simd
                for (long k = 0; k < c; k++) out[k] = (in[k] - mu[k]) * sc[k] + beta[k];
            }
        }
    }
    free(part); free(scale); free(mean_c);
    return 0;
}

/* ----------------------------------------------------------------------------------------- attention */

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };   /* CBLAS enum values */

static sgemm_fn sgemm;
static set_threads_fn blas_set_threads;
static get_threads_fn blas_get_threads;

/* The BLAS's cblas_sgemm, and (optionally, may be NULL) its thread-count setter / getter: each OpenMP
 * thread runs its own single-threaded GEMMs, so the BLAS's own threads are switched off meanwhile. */
void sdk_set_blas(void *gemm, void *set_threads, void *get_threads) {
    sgemm = (sgemm_fn)gemm;
    blas_set_threads = (set_threads_fn)set_threads;
    blas_get_threads = (get_threads_fn)get_threads;
}

int sdk_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* softmax(scale q k^T) v per (batch, head). q/k/v: element (b, token, h*d + i) at
 * base + b*batch_stride + token*row_stride + h*d + i, so projections' outputs (also a fused qkv buffer, at
 * offsets) are read in place; out [b, lq, heads*d] contiguous. Work is split over (batch, head, block of
 * `block` queries); keys are taken `key_block` at a time (0: all at once) with an online softmax, so the
 * scores tile (block x key_block) stays in L2: scores = q_blk k_tile^T (sgemm), exp2 with the running row
 * max subtracted (the output so far and the row sums rescaled when the max grows), out += P v_tile (sgemm);
 * rows are divided by their sums at the end (d columns instead of lk). Returns 0, -1 without a BLAS, -2 out
 * of memory. */
int sdk_attention(const float *q, long q_bs, long q_rs, const float *k, long k_bs, long k_rs,
                  const float *v, long v_bs, long v_rs, float *out, long b, long heads, long lq, long lk,
                  long d, float scale, long block, long key_block) {
    if (!sgemm) return -1;
    if (block > lq) block = lq;
    if (key_block <= 0 || key_block > lk) key_block = lk;
    long q_blocks = (lq + block - 1) / block, tasks = b * heads * q_blocks, ld_out = heads * d;
    int threads = sdk_threads();
    size_t per_thread = (size_t)block * (size_t)(key_block + 2);
    float *scratch = malloc(sizeof(float) * (size_t)threads * per_thread);
    if (!scratch) return -2;
    int previous = blas_get_threads ? blas_get_threads() : 0;
    if (blas_set_threads) blas_set_threads(1);
    const float alpha = scale * LOG2E;            /* scores in log2 units: exp2 needs no extra multiply */
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *scores = scratch + (size_t)omp_get_thread_num() * per_thread;
#else
        float *scores = scratch;
#endif
        float *row_max = scores + block * key_block, *row_sum = row_max + block;
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; t++) {
            long qb = t % q_blocks, h = (t / q_blocks) % heads, bi = t / (q_blocks * heads);
            long i0 = qb * block, m = lq - i0 < block ? lq - i0 : block;
            const float *qp = q + bi * q_bs + i0 * q_rs + h * d;
            float *op = out + (bi * lq + i0) * ld_out + h * d;
            for (long j0 = 0; j0 < lk; j0 += key_block) {
                long n = lk - j0 < key_block ? lk - j0 : key_block;
                const float *kp = k + bi * k_bs + j0 * k_rs + h * d, *vp = v + bi * v_bs + j0 * v_rs + h * d;
                sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)m, (int)n, (int)d, alpha, qp, (int)q_rs, kp, (int)k_rs,
                      0.0f, scores, (int)n);
                for (long i = 0; i < m; i++) {
                    float *row = scores + i * n;
                    float top = row[0], sum = 0.0f;
                    #pragma omp simd reduction(max:top)
                    for (long j = 0; j < n; j++) top = row[j] > top ? row[j] : top;
                    if (j0 == 0) {
                        row_max[i] = top;
                        row_sum[i] = 0.0f;
                    } else if (top > row_max[i]) {
                        float shrink = exp2_poly(row_max[i] - top), *o = op + i * ld_out;
                        row_sum[i] *= shrink;
                        #pragma omp simd
                        for (long c = 0; c < d; c++) o[c] *= shrink;
                        row_max[i] = top;
                    }
                    top = row_max[i];
                    #pragma omp simd reduction(+:sum)
                    for (long j = 0; j < n; j++) {
                        row[j] = exp2_poly(row[j] - top);
                        sum += row[j];
                    }
                    row_sum[i] += sum;
                }
                sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)m, (int)d, (int)n, 1.0f, scores, (int)n, vp, (int)v_rs,
                      j0 ? 1.0f : 0.0f, op, (int)ld_out);
            }
            for (long i = 0; i < m; i++) {
                float *o = op + i * ld_out, inv = 1.0f / row_sum[i];
                #pragma omp simd
                for (long c = 0; c < d; c++) o[c] *= inv;
            }
        }
    }
    if (blas_set_threads) blas_set_threads(previous);
    free(scratch);
    return 0;
}

/* ------------------------------------------------------------------------------------------- conv 3x3 */

/* 3x3 convolution, stride 1, zero padding 1, channels-last, as 9 GEMMs over shifted views of one padded
 * copy (no 9x im2col buffer): with the padded image flattened to rows of (w + 2) pixels, output pixel p
 * is sum over taps (dy, dx) of xp[p + (dy - 1)(w + 2) + dx - 1] . weight[:, dy, dx, :]^T, so each tap is one
 * GEMM over all padded pixels at once (A = xp shifted, lda = cin). The border rows of that padded result
 * are discarded when the interior is copied out with the bias.
 * x [b, h, w, cin], weight [cout, 3, 3, cin] (MLX's layout), bias [cout] or NULL, y [b, h, w, cout].
 * `padded` / `acc` are caller-provided scratch of (b (h+2)(w+2) + 2 (w+3)) cin and b (h+2)(w+2) cout floats.
 * The GEMMs use the BLAS's own threads. Returns 0, or -1 without a BLAS. */
int sdk_conv3x3(const float *x, const float *weight, const float *bias, float *y, long b, long h, long w,
                long cin, long cout, float *padded, float *acc) {
    if (!sgemm) return -1;
    long wp = w + 2, rows = b * (h + 2) * wp, margin = w + 3;
    float *xp = padded + margin * cin;                       /* pixel 0 of the padded images */
    memset(padded, 0, sizeof(float) * margin * cin);
    memset(xp + rows * cin, 0, sizeof(float) * margin * cin);
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < b * (h + 2); r++) {                 /* one padded image row at a time */
        long bi = r / (h + 2), yy = r % (h + 2) - 1;
        float *dst = xp + r * wp * cin;
        if (yy < 0 || yy >= h) {
            memset(dst, 0, sizeof(float) * wp * cin);
            continue;
        }
        memset(dst, 0, sizeof(float) * cin);
        memcpy(dst + cin, x + ((bi * h + yy) * w) * cin, sizeof(float) * w * cin);
        memset(dst + (w + 1) * cin, 0, sizeof(float) * cin);
    }
    for (int tap = 0; tap < 9; tap++) {
        long dy = tap / 3, dx = tap % 3, shift = (dy - 1) * wp + (dx - 1);
        sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)rows, (int)cout, (int)cin, 1.0f, xp + shift * cin, (int)cin,
              weight + tap * cin, (int)(9 * cin), tap ? 1.0f : 0.0f, acc, (int)cout);
    }
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < b * h; r++) {
        long bi = r / h, yy = r % h;
        const float *src = acc + ((bi * (h + 2) + yy + 1) * wp + 1) * cout;
        float *dst = y + r * w * cout;
        for (long px = 0; px < w; px++) {
            #pragma omp simd
            for (long k = 0; k < cout; k++) dst[px * cout + k] = src[px * cout + k] + (bias ? bias[k] : 0.0f);
        }
    }
    return 0;
}
