/* CPU kernels with one fixed order of arithmetic per row: paged causal attention, row sums,
 * RMSNorm and the rotary embedding (op for op the torch sequences transformers runs), the
 * KV-cache store, and bfloat16 linears on AMX tiles (at the end of this file).
 *
 * An attention row (one query position of one head) is computed by `tile_impl` from its query,
 * its position and the keys and values it sees, and nothing else: no other row, thread count,
 * vector width or CPU changes a bit. Only IEEE float32 operations are used, each rounded once:
 * adds, multiplies, divides (and square roots, in RMSNorm), and in attention's two products
 * fused multiply-adds (`fmadd`: a * b + c rounded once, which IEEE 754 defines exactly, so a CPU
 * without the instruction computes the same bits in libm's fmaf). The compiler fuses nothing on
 * its own (built with -ffp-contract=off), exp included (`exp_fixed` below), so a vectorized loop
 * and its scalar remainder give the same bits.
 *
 * For a row at position p with keys 0..p in splits of S keys (split j = cache block table[j]):
 *   s_k = fma(q[D-1], K_k[D-1], .. fma(q[1], K_k[1], fma(q[0], K_k[0], 0)))  (q already scaled)
 *   m = max s_k;  w_k = exp(s_k - m), 0 where s_k - m <= -87
 *   l = sum over lanes t of (sum over splits j, in order, of w_{jS+t}), lanes added pairwise
 *   out[d] = (the same fused chain over k, in order, of w_k * V_k[d]) / l
 *
 * K blocks are stored transposed ([kv_heads][D][S] per block), V blocks as [kv_heads][S][D];
 * float32 or bfloat16 (widened exactly on load).
 */
#define _GNU_SOURCE  /* syscall(), for the AMX permission below */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SUBNORMAL_CUT -87.0f

typedef struct {
    const float *q;          /* [rows][heads][D], scaled */
    const int64_t *pos;      /* [rows] */
    const int64_t *tables;   /* row r's block table starts at tables + r * table_stride */
    int64_t table_stride;
    const void *k_cache, *v_cache;
    int64_t block_stride;    /* elements from one block to the next (K and V alike) */
    int bf16;                /* the caches hold bfloat16 (else float32) */
    int64_t rows, heads, kv_heads, d, s;
    float *out;              /* [rows][heads][D] */
} Args;

/* exp(x) for -87 < x <= 0: 2^n * e^r, n = round(x / ln 2), |r| <= ln(2) / 2, e^r by the Cephes
 * polynomial; every step a separately rounded float op. */
static inline float exp_fixed(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return y * scale.f;
}

/* 16 floats, added and multiplied lane by lane (each lane an IEEE float op: the same bits as
 * the scalar loops below); GCC lowers them to whatever vectors the CPU has. */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
#define LANES 16
#define MAX_S 256

static inline float same(float x) { return x; }  /* float32 as is */
static inline float load_bf16(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}
static inline vf loadv_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vf loadv_bf16(const uint16_t *p) {
#ifdef __AVX512F__  /* one zero-extending load (GCC splits the generic one into halves) */
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)),
                                        16);
    return (vf)_mm512_castsi512_ps(u);
#else
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
#endif
}
static inline void storev(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) {  /* one broadcast (a lane loop compiles to 16 inserts) */
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

/* Whether the fused multiply-adds below are one instruction (else libm's exact fmaf, the same
 * bits, tens of times slower: x86 CPUs before Haswell, emulators without AVX2). */
int hardware_fma(void) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__FMA__)
    return 0;
#else
    return 1;  /* x86 with FMA; assumed elsewhere (aarch64: FMA in its base instruction set) */
#endif
}

/* a * b + c, rounded once, in every lane. */
static inline vf fmadd(vf a, vf b, vf c) {
#ifdef __AVX512F__
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    vf r;
    for (int t = 0; t < LANES; t++) r[t] = __builtin_fmaf(a[t], b[t], c[t]);
    return r;
#endif
}

/* Two vectors from 2 * LANES elements (load2), and back to memory in element order (store2).
 * bfloat16 under AVX-512: the even elements and the odd ones, widened by one load, a shift and a
 * mask (no lane crossing, fewer instructions than two zero-extending loads); otherwise the
 * first LANES and the next. Each element keeps its own lane from load to store,
 * so the arithmetic of every element is the same either way. The tile loops take bfloat16
 * vectors two at a time where they come in pairs (PAIRS), float32 one at a time. */
#define PAIRS(T, n) (sizeof(T) == 2 && (n) % 2 == 0)
static inline void load2_f32(const float *p, vf *a, vf *b) {
    *a = loadv_f32(p);
    *b = loadv_f32(p + LANES);
}
static inline void store2_f32(float *p, vf a, vf b) {
    storev(p, a);
    storev(p + LANES, b);
}
static inline void load2_bf16(const uint16_t *p, vf *a, vf *b) {
#ifdef __AVX512F__
    const __m512i u = _mm512_loadu_si512((const void *)p);
    *a = (vf)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *b = (vf)_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
#else
    *a = loadv_bf16(p);
    *b = loadv_bf16(p + LANES);
#endif
}
static inline void store2_bf16(float *p, vf a, vf b) {
#ifdef __AVX512F__  /* a holds elements 0, 2, .., b 1, 3, ..: interleave them */
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                        24, 8);
    storev(p, (vf)_mm512_permutex2var_ps((__m512)a, lo, (__m512)b));
    storev(p + LANES, (vf)_mm512_permutex2var_ps((__m512)a, hi, (__m512)b));
#else
    store2_f32(p, a, b);
#endif
}

/* Scores of one query against `nb` (1 or 2) K blocks [d][s]: out[t] = q[i] * K[i][t]
 * fused-added over i, in order, from 0. Vector accumulators where s is a multiple of LANES
 * (constant, see SHAPE); two blocks at once keep twice the independent adds in flight. */
#define DEFINE_KERNELS(NAME, T, LOAD)                                                          \
static inline __attribute__((always_inline)) void NAME##_scores(                              \
        const float *restrict q, const T *const *blocks, int nb, float *const *outs,          \
        int64_t d, int64_t s) {                                                               \
    if (s % LANES == 0 && s <= 4 * LANES) {                                                   \
        const int64_t nv = s / LANES;                                                         \
        vf acc[2][4];                                                                         \
        for (int b = 0; b < nb; b++)                                                          \
            for (int64_t v = 0; v < nv; v++) acc[b][v] = (vf){0};                             \
        for (int64_t i = 0; i < d; i++) {                                                     \
            const vf qi = splat(q[i]);                                                        \
            for (int b = 0; b < nb; b++)                                                      \
                for (int64_t v = 0; v < nv; v++)                                              \
                    acc[b][v] = fmadd(qi, loadv_##NAME(blocks[b] + i * s + v * LANES),        \
                                      acc[b][v]);                                             \
        }                                                                                     \
        for (int b = 0; b < nb; b++)                                                          \
            for (int64_t v = 0; v < nv; v++) storev(outs[b] + v * LANES, acc[b][v]);          \
        return;                                                                               \
    }                                                                                         \
    for (int b = 0; b < nb; b++) {                                                            \
        float acc[MAX_S];                                                                     \
        for (int64_t t = 0; t < s; t++) acc[t] = 0.0f;                                        \
        for (int64_t i = 0; i < d; i++)                                                       \
            for (int64_t t = 0; t < s; t++)                                                   \
                acc[t] = __builtin_fmaf(q[i], LOAD(blocks[b][i * s + t]), acc[t]);            \
        for (int64_t t = 0; t < s; t++) outs[b][t] = acc[t];                                  \
    }                                                                                         \
}                                                                                             \
/* out[i] = fma(w[t], V[t][i], out[i]) for t < n, in order; V [s][d]. */                     \
static inline __attribute__((always_inline)) void NAME##_values(                              \
        const float *restrict w, const T *restrict vb, int64_t n, float *restrict out,        \
        int64_t d) {                                                                          \
    if (d % LANES == 0 && d <= 16 * LANES) {                                                  \
        const int64_t nv = d / LANES;                                                         \
        vf acc[16];                                                                           \
        for (int64_t v = 0; v < nv; v++) acc[v] = loadv_f32(out + v * LANES);                 \
        for (int64_t t = 0; t < n; t++) {                                                     \
            const vf wt = splat(w[t]);                                                        \
            for (int64_t v = 0; v < nv; v++)                                                  \
                acc[v] = fmadd(wt, loadv_##NAME(vb + t * d + v * LANES), acc[v]);             \
        }                                                                                     \
        for (int64_t v = 0; v < nv; v++) storev(out + v * LANES, acc[v]);                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t t = 0; t < n; t++)                                                           \
        for (int64_t i = 0; i < d; i++)                                                       \
            out[i] = __builtin_fmaf(w[t], LOAD(vb[t * d + i]), out[i]);                       \
}

DEFINE_KERNELS(f32, float, same)
DEFINE_KERNELS(bf16, uint16_t, load_bf16)

/* The largest of x[0..n), n >= 1: LANES running maxima (lane t sees x[t], x[t + LANES], ..),
 * then the lanes and the remainder in order. For finite x that is the value the loop
 * `m = x[k] > m ? x[k] : m` from m = x[0] finds, up to the sign of a zero maximum, which
 * `weights` does not see (s - (+0) and s - (-0) are the same float; exp of either zero is 1). */
static float row_max(const float *x, int64_t n) {
    vf m = splat(x[0]);
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) {
        const vf v = loadv_f32(x + k);
        const vu more = (vu)(v > m);
        m = (vf)(((vu)v & more) | ((vu)m & ~more));
    }
    float r = x[0];
    for (int t = 0; t < LANES; t++) r = m[t] > r ? m[t] : r;
    for (; k < n; k++) r = x[k] > r ? x[k] : r;
    return r;
}

/* Weights w_k in place of the scores of one row (keys >= n masked), and their sum l. */
static float weights(float *sc, int64_t n, int64_t splits, int64_t s, float *lanes) {
    const float m = row_max(sc, n);
    for (int64_t k = 0; k < n; k++) {
        float x = sc[k] - m;
        sc[k] = x <= SUBNORMAL_CUT ? 0.0f : exp_fixed(x);
    }
    for (int64_t k = n; k < splits * s; k++) sc[k] = 0.0f;
    for (int64_t t = 0; t < s; t++) lanes[t] = sc[t];
    for (int64_t j = 1; j < splits; j++)
        for (int64_t t = 0; t < s; t++) lanes[t] = lanes[t] + sc[j * s + t];
    int64_t width = s;
    while (width > 1 && (width & 1) == 0) {  /* pairwise while the width halves evenly */
        width /= 2;
        for (int64_t t = 0; t < width; t++) lanes[t] = lanes[t] + lanes[t + width];
    }
    float l = lanes[0];
    for (int64_t t = 1; t < width; t++) l = l + lanes[t];
    return l;
}

/* One query of a tile: its scaled q [D], where its output goes, how many keys it sees. */
typedef struct {
    const float *q;
    float *out;
    int64_t n;
} Query;

#define MAX_TILE 8  /* queries per tile: each K / V vector loaded is used by all of them */
#define ACCS 16     /* vector accumulators a tile keeps in registers */

/* Scores of the NQ queries of a tile against `nb` K blocks [d][s] (s a multiple of LANES, at
 * most 4 * LANES): for every query, lane t fused-adds q[i] * K[i][t] over i in order, as
 * NAME##_scores does for one query; here each K vector feeds every query. */
#define DEFINE_TILE(NAME, T)                                                                   \
static inline __attribute__((always_inline)) void NAME##_tile_scores(                         \
        const Query *qs, const int nq, const T *const *blocks, const int nb, float *sc,       \
        int64_t stride, int64_t j, const int64_t d, const int64_t s) {                        \
    const int64_t nv = s / LANES;                                                             \
    vf acc[MAX_TILE][2][4];                                                                   \
    for (int k = 0; k < nq; k++)                                                              \
        for (int b = 0; b < nb; b++)                                                          \
            for (int64_t v = 0; v < nv; v++) acc[k][b][v] = (vf){0};                          \
    for (int64_t i = 0; i < d; i++) {                                                         \
        for (int b = 0; b < nb; b++)                                                          \
            for (int64_t v = 0; v < nv; v += PAIRS(T, nv) ? 2 : 1) {                          \
                vf kv, kw;  /* lanes of keys v * LANES.. (and the next LANES: see load2) */   \
                if (PAIRS(T, nv)) load2_##NAME(blocks[b] + i * s + v * LANES, &kv, &kw);      \
                else kv = loadv_##NAME(blocks[b] + i * s + v * LANES);                        \
                for (int k = 0; k < nq; k++) {                                                \
                    const vf qk = splat(qs[k].q[i]);                                          \
                    acc[k][b][v] = fmadd(qk, kv, acc[k][b][v]);                               \
                    if (PAIRS(T, nv)) acc[k][b][v + 1] = fmadd(qk, kw, acc[k][b][v + 1]);     \
                }                                                                             \
            }                                                                                 \
    }                                                                                         \
    for (int k = 0; k < nq; k++)                                                              \
        for (int b = 0; b < nb; b++) {                                                        \
            float *out = sc + k * stride + (j + b) * s;                                       \
            for (int64_t v = 0; v < nv; v += PAIRS(T, nv) ? 2 : 1) {                          \
                if (PAIRS(T, nv))                                                             \
                    store2_##NAME(out + v * LANES, acc[k][b][v], acc[k][b][v + 1]);           \
                else storev(out + v * LANES, acc[k][b][v]);                                   \
            }                                                                                 \
        }                                                                                     \
}                                                                                             \
/* For every query, lanes [c, c + width) of out (width = CH vectors): w_k * V_k fused-added over \
 * its keys, in order across the splits; each V vector feeds every query still seeing keys. */ \
static inline __attribute__((always_inline)) void NAME##_tile_values(                         \
        const Query *qs, const int nq, const float *sc, int64_t stride, const int64_t *table, \
        const T *v_cache, int64_t block_stride, int64_t offset, int64_t splits, float *acc,   \
        int64_t c, const int CH, const int64_t d, const int64_t s) {                          \
    vf sum[MAX_TILE][ACCS];                                                                   \
    for (int k = 0; k < nq; k++)                                                              \
        for (int v = 0; v < CH; v++) sum[k][v] = (vf){0};                                     \
    for (int64_t j = 0; j < splits; j++) {                                                    \
        const T *vb = v_cache + table[j] * block_stride + offset + c;                         \
        int64_t all = s, any = 0;   /* keys every query sees / some query sees */             \
        for (int k = 0; k < nq; k++) {                                                        \
            int64_t seen = qs[k].n - j * s;                                                   \
            seen = seen < 0 ? 0 : seen > s ? s : seen;                                        \
            all = seen < all ? seen : all;                                                    \
            any = seen > any ? seen : any;                                                    \
        }                                                                                     \
        for (int64_t t = 0; t < any; t++) {                                                   \
            vf vv[ACCS];  /* in load2's lanes where CH is even */                             \
            for (int v = 0; v < CH; v += PAIRS(T, CH) ? 2 : 1) {                              \
                if (PAIRS(T, CH)) load2_##NAME(vb + t * d + v * LANES, &vv[v], &vv[v + 1]);   \
                else vv[v] = loadv_##NAME(vb + t * d + v * LANES);                            \
            }                                                                                 \
            for (int k = 0; k < nq; k++) {                                                    \
                if (t >= all && j * s + t >= qs[k].n) continue;                               \
                const vf w = splat(sc[k * stride + j * s + t]);                               \
                for (int v = 0; v < CH; v++) sum[k][v] = fmadd(w, vv[v], sum[k][v]);          \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (int k = 0; k < nq; k++)                                                              \
        for (int v = 0; v < CH; v += PAIRS(T, CH) ? 2 : 1) {                                  \
            if (PAIRS(T, CH))                                                                 \
                store2_##NAME(acc + k * d + c + v * LANES, sum[k][v], sum[k][v + 1]);         \
            else storev(acc + k * d + c + v * LANES, sum[k][v]);                              \
        }                                                                                     \
}

DEFINE_TILE(f32, float)
DEFINE_TILE(bf16, uint16_t)

/* The NQ queries of a tile, all reading kv head h through one block table: scores, weights,
 * values, as `attend` describes, each query's arithmetic the same whatever shares its tile.
 * Inlined with nq, d and s constant (see TILE) where s and d are whole vectors. */
static inline __attribute__((always_inline)) void tile_impl(
        const Args *a, const int64_t *table, int64_t h, const Query *qs, const int nq,
        float *sc, int64_t stride, float *lanes, float *acc, const int64_t d, const int64_t s) {
    int64_t splits = 0;
    for (int k = 0; k < nq; k++) {
        const int64_t own = (qs[k].n + s - 1) / s;
        splits = own > splits ? own : splits;
    }
    const int vector = s % LANES == 0 && s <= 4 * LANES && d % LANES == 0;
    const int nb = vector && nq <= 2 ? 2 : 1;  /* blocks per pass: accumulators in registers */
    for (int64_t j = 0; j < splits; j += nb) {
        const int take = j + 1 < splits ? nb : 1;
        int64_t at[2];
        for (int b = 0; b < take; b++) at[b] = table[j + b] * a->block_stride + h * d * s;
        if (vector && a->bf16) {
            const uint16_t *blocks[2] = {(const uint16_t *)a->k_cache + at[0],
                                         (const uint16_t *)a->k_cache + at[take - 1]};
            bf16_tile_scores(qs, nq, blocks, take, sc, stride, j, d, s);
        } else if (vector) {
            const float *blocks[2] = {(const float *)a->k_cache + at[0],
                                      (const float *)a->k_cache + at[take - 1]};
            f32_tile_scores(qs, nq, blocks, take, sc, stride, j, d, s);
        } else {
            for (int k = 0; k < nq; k++)
                for (int b = 0; b < take; b++) {
                    float *out[1] = {sc + k * stride + (j + b) * s};
                    if (a->bf16) {
                        const uint16_t *blk[1] = {(const uint16_t *)a->k_cache + at[b]};
                        bf16_scores(qs[k].q, blk, 1, out, d, s);
                    } else {
                        const float *blk[1] = {(const float *)a->k_cache + at[b]};
                        f32_scores(qs[k].q, blk, 1, out, d, s);
                    }
                }
        }
    }
    float l[MAX_TILE];
    for (int k = 0; k < nq; k++)
        l[k] = weights(sc + k * stride, qs[k].n, (qs[k].n + s - 1) / s, s, lanes);
    const int64_t offset = h * s * d;
    if (vector) {
        int CH = ACCS / nq < d / LANES ? ACCS / nq : (int)(d / LANES);
        while ((d / LANES) % CH) CH--;  /* chunks of CH vectors cover d exactly */
        for (int64_t c = 0; c < d; c += CH * LANES) {
            if (a->bf16)
                bf16_tile_values(qs, nq, sc, stride, table, a->v_cache, a->block_stride, offset,
                                 splits, acc, c, CH, d, s);
            else
                f32_tile_values(qs, nq, sc, stride, table, a->v_cache, a->block_stride, offset,
                                splits, acc, c, CH, d, s);
        }
    } else {
        memset(acc, 0, sizeof(float) * nq * d);
        for (int k = 0; k < nq; k++)
            for (int64_t j = 0; j * s < qs[k].n; j++) {
                const int64_t at = table[j] * a->block_stride + offset;
                const int64_t seen = qs[k].n - j * s < s ? qs[k].n - j * s : s;
                const float *w = sc + k * stride + j * s;
                if (a->bf16)
                    bf16_values(w, (const uint16_t *)a->v_cache + at, seen, acc + k * d, d);
                else f32_values(w, (const float *)a->v_cache + at, seen, acc + k * d, d);
            }
    }
    for (int k = 0; k < nq; k++)
        for (int64_t i = 0; i < d; i++) qs[k].out[i] = acc[k * d + i] / l[k];
}

#define TILE(NQ, D, S)                                                                        \
static void tile_##NQ##_##D##_##S(const Args *a, const int64_t *table, int64_t h,            \
                                  const Query *qs, float *sc, int64_t stride, float *lanes,  \
                                  float *acc) {                                              \
    tile_impl(a, table, h, qs, NQ, sc, stride, lanes, acc, D, S);                            \
}
#define SHAPE(D, S) TILE(1, D, S) TILE(2, D, S) TILE(4, D, S) TILE(8, D, S)
SHAPE(64, 16) SHAPE(64, 32) SHAPE(64, 64) SHAPE(128, 16) SHAPE(128, 32) SHAPE(128, 64)
SHAPE(256, 16) SHAPE(256, 32) SHAPE(256, 64)

/* nq (1, 2, 4 or 8) queries at once. */
static void tile(const Args *a, const int64_t *table, int64_t h, const Query *qs, int nq,
                 float *sc, int64_t stride, float *lanes, float *acc) {
#define CASE(NQ, D, S)                                                                        \
    if (nq == NQ && a->d == D && a->s == S)                                                   \
        return tile_##NQ##_##D##_##S(a, table, h, qs, sc, stride, lanes, acc);
#define CASES(D, S) CASE(1, D, S) CASE(2, D, S) CASE(4, D, S) CASE(8, D, S)
    CASES(64, 16) CASES(64, 32) CASES(64, 64) CASES(128, 16) CASES(128, 32) CASES(128, 64)
    CASES(256, 16) CASES(256, 32) CASES(256, 64)
#undef CASES
#undef CASE
    tile_impl(a, table, h, qs, nq, sc, stride, lanes, acc, a->d, a->s);
}

/* Rows per item: rows sharing one block table (a prefill chunk: table_stride 0) go together,
 * up to MAX_TILE queries; rows of their own tables (decode) one by one. */
static int64_t rows_per_item(const Args *a) {
    const int64_t g = a->heads / a->kv_heads;
    return a->table_stride == 0 && g < MAX_TILE ? MAX_TILE / g : 1;
}

/* Items lo..hi-1 are (kv head, run of rows) pairs, kv-head-major: consecutive items share
 * blocks while they are in cache. A run's queries (its rows' g heads each) go through `tile`
 * 8, 4, 2, 1 at a time. Returns 0, or -1 where scratch memory ran out. */
static int run_items(const Args *a, int64_t lo, int64_t hi) {
    const int64_t per = rows_per_item(a), runs = (a->rows + per - 1) / per;
    int64_t max_splits = 1;
    for (int64_t r = 0; r < a->rows; r++) {
        const int64_t splits = a->pos[r] / a->s + 1;
        max_splits = splits > max_splits ? splits : max_splits;
    }
    const int64_t g = a->heads / a->kv_heads, stride = max_splits * a->s;
    float *scratch = malloc(sizeof(float) * (a->s + MAX_TILE * (a->d + stride)));
    Query *qs = malloc(sizeof(Query) * per * g);
    if (scratch == NULL || qs == NULL) {
        free(scratch);
        free(qs);
        return -1;
    }
    float *lanes = scratch, *acc = scratch + a->s, *sc = acc + MAX_TILE * a->d;
    for (int64_t item = lo; item < hi; item++) {
        const int64_t h = item / runs, r0 = (item % runs) * per;
        const int64_t r1 = r0 + per < a->rows ? r0 + per : a->rows;
        int64_t n = 0;
        for (int64_t r = r0; r < r1; r++)
            for (int64_t i = 0; i < g; i++) {
                const int64_t at = (r * a->heads + h * g + i) * a->d;
                qs[n++] = (Query){a->q + at, a->out + at, a->pos[r] + 1};
            }
        const int64_t *table = a->tables + r0 * a->table_stride;
        for (int64_t k = 0; k < n;) {
            const int nq = n - k >= 8 ? 8 : n - k >= 4 ? 4 : n - k >= 2 ? 2 : 1;
            tile(a, table, h, qs + k, nq, sc, stride, lanes, acc);
            k += nq;
        }
    }
    free(scratch);
    free(qs);
    return 0;
}

/* Returns 0, or -1 where memory ran out. `bf16`: the caches hold bfloat16. Items are cut among
 * `threads` OpenMP threads (the process's own pool, torch's) at equal key counts, a row's cost;
 * which thread runs an item, and which queries share its tiles, change none of its bits. */
int attend(const float *q, const int64_t *pos, const int64_t *tables, int64_t table_stride,
           const void *k_cache, const void *v_cache, int64_t block_stride, int bf16,
           int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, int64_t s, float *out,
           int64_t threads) {
    const Args a = {q, pos, tables, table_stride, k_cache, v_cache, block_stride, bf16, rows,
                    heads, kv_heads, d, s, out};
    const int64_t per = rows_per_item(&a), runs = (rows + per - 1) / per, items = runs * kv_heads;
    if (threads > items) threads = items;
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    int64_t bounds[257];
    double total = 0, done = 0;
    for (int64_t r = 0; r < rows; r++) total += (double)(pos[r] + 1) * kv_heads;
    bounds[0] = 0;
    for (int64_t t = 0, end = 0; t < threads; t++) {
        const double goal = total * (double)(t + 1) / (double)threads;
        while (end < items && (t == threads - 1 || done < goal)) {
            const int64_t r0 = (end % runs) * per, r1 = r0 + per < rows ? r0 + per : rows;
            for (int64_t r = r0; r < r1; r++) done += pos[r] + 1;
            end++;
        }
        bounds[t + 1] = end;
    }
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int64_t t = 0; t < threads; t++)
        failed |= run_items(&a, bounds[t], bounds[t + 1]) != 0;
    return failed ? -1 : 0;
}

/* out[r] = the sum of x[r][0..n), x contiguous float32 [rows][n]: lane t (of 4 * LANES) adds
 * x[r][t], x[r][t + 4 * LANES], ... in order, then the lanes are added pairwise. */
static float one_row_sum(const float *x, int64_t n) {
    enum { WIDE = 4 * LANES };
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + WIDE <= n; i += WIDE)
        for (int v = 0; v < 4; v++) acc[v] = acc[v] + loadv_f32(x + i + v * LANES);
    float lanes[WIDE];
    for (int v = 0; v < 4; v++) storev(lanes + v * LANES, acc[v]);
    for (int64_t t = 0; i + t < n; t++) lanes[t] = lanes[t] + x[i + t];
    for (int width = WIDE / 2; width >= 1; width /= 2)
        for (int t = 0; t < width; t++) lanes[t] = lanes[t] + lanes[t + width];
    return lanes[0];
}

void row_sum(const float *x, int64_t rows, int64_t n, float *out, int64_t threads) {
    if (threads < 1 || rows * n < (1 << 16)) threads = 1;  /* small: not worth a thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = one_row_sum(x + r * n, n);
}

/* float32 to bfloat16, rounded to nearest even (torch's conversion; NaN to a quiet NaN). */
static inline uint16_t to_bf16(float x) {
    union { float f; uint32_t u; } v = {x};
    const uint16_t rounded = (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
    return x != x ? 0x7FC0 : rounded;
}

static inline float widen(const void *p, int64_t i, int bf16) {
    return bf16 ? load_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Hugging Face's RMSNorm of Llama/Qwen, op for op as torch runs it (each op rounded on its own,
 * the mean's sum in `row_sum`'s order): xf = float32(x); s = sum(xf * xf); r = 1 / sqrt(s / n +
 * eps); out = weight * dtype(xf * r). x, weight, out: [rows][n] / [n] float32 or bfloat16. */
static void rms_row(const void *x, const void *w, void *out, int64_t n, float eps, int bf16,
                    float *sq) {
    for (int64_t i = 0; i < n; i++) {
        const float v = widen(x, i, bf16);
        sq[i] = v * v;
    }
    const float r = 1.0f / __builtin_sqrtf(one_row_sum(sq, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        const float y = widen(x, i, bf16) * r;
        if (bf16)
            ((uint16_t *)out)[i] = to_bf16(widen(w, i, 1) * load_bf16(to_bf16(y)));
        else ((float *)out)[i] = ((const float *)w)[i] * y;
    }
}

static int rms_rows(const void *x, const void *w, void *out, int64_t lo, int64_t hi, int64_t n,
                    float eps, int bf16) {
    float *sq = malloc(sizeof(float) * n);
    if (sq == NULL) return -1;
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t r = lo; r < hi; r++)
        rms_row((const char *)x + r * n * size, w, (char *)out + r * n * size, n, eps, bf16, sq);
    free(sq);
    return 0;
}

/* Rows cut among `threads` OpenMP threads. Returns 0, or -1 where scratch memory ran out. */
int rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t n, double eps,
             int bf16, int64_t threads) {
    if (threads < 1 || rows * n < (1 << 15)) threads = 1;  /* small: not worth a thread */
    if (threads > rows) threads = rows > 0 ? rows : 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int64_t t = 0; t < threads; t++)
        failed |= rms_rows(x, w, out, rows * t / threads, rows * (t + 1) / threads, n,
                           (float)eps, bf16) != 0;
    return failed ? -1 : 0;
}

/* Rotary embedding of x [T][H][D] at cos, sin [T][D] (each token's row of the tables), as
 * transformers computes x * cos + rotate_half(x) * sin, each op rounded to the dtype:
 * out[i] = x[i] * cos[i] - x[i + D/2] * sin[i] (i < D/2), x[i] * cos[i] + x[i - D/2] * sin[i]. */
#define DEFINE_ROTATE(NAME, T, LOAD, STORE, ROUND)                                            \
static void NAME(const T *restrict x, const T *restrict cs, const T *restrict sn,             \
                 T *restrict out, int64_t h, int64_t d) {                                     \
    const int64_t half = d / 2;                                                               \
    for (int64_t j = 0; j < h; j++, x += d, out += d) {                                       \
        for (int64_t i = 0; i < half; i++)                                                    \
            out[i] = STORE(ROUND(LOAD(x[i]) * LOAD(cs[i])) -                                  \
                           ROUND(LOAD(x[i + half]) * LOAD(sn[i])));                           \
        for (int64_t i = half; i < d; i++)                                                    \
            out[i] = STORE(ROUND(LOAD(x[i]) * LOAD(cs[i])) +                                  \
                           ROUND(LOAD(x[i - half]) * LOAD(sn[i])));                           \
    }                                                                                         \
}
static inline float bf16_round(float x) { return load_bf16(to_bf16(x)); }
DEFINE_ROTATE(rotate_f32, float, same, same, same)
DEFINE_ROTATE(rotate_bf16, uint16_t, load_bf16, to_bf16, bf16_round)

void rotate(const void *x, const void *cs, const void *sn, void *out, int64_t tokens, int64_t h,
            int64_t d, int bf16, int64_t threads) {
    const int64_t size = bf16 ? 2 : 4;
    if (threads < 1 || tokens * h * d < (1 << 15)) threads = 1;  /* small: not worth a thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const char *in = (const char *)x + t * h * d * size;
        const char *c = (const char *)cs + t * d * size, *s = (const char *)sn + t * d * size;
        char *o = (char *)out + t * h * d * size;
        if (bf16)
            rotate_bf16((const uint16_t *)in, (const uint16_t *)c, (const uint16_t *)s,
                        (uint16_t *)o, h, d);
        else rotate_f32((const float *)in, (const float *)c, (const float *)s, (float *)o, h, d);
    }
}

/* One kv head's values of each token (contiguous [tokens][kv_heads][d], element type T) into
 * the cache at slot = block * s + offset: K transposed ([block][kv_heads][d][s]) or V
 * ([block][kv_heads][s][d]). Tokens in order: where two share a slot, the later one stays. */
#define DEFINE_STORE(NAME, T)                                                                  \
static void NAME(const T *in, T *cache, const int64_t *slots, int64_t tokens, int64_t h,      \
                 int64_t kv_heads, int64_t d, int64_t s, int64_t transposed) {                \
    for (int64_t t = 0; t < tokens; t++) {                                                    \
        const int64_t block = slots[t] / s, offset = slots[t] % s;                            \
        const T *from = in + (t * kv_heads + h) * d;                                          \
        T *head = cache + (block * kv_heads + h) * d * s;                                     \
        if (transposed) {                                                                     \
            if (t + 1 < tokens) { /* the next token's lines, while this one's are written */  \
                const int64_t nb = slots[t + 1] / s, no = slots[t + 1] % s;                   \
                T *next = cache + (nb * kv_heads + h) * d * s + no;                           \
                for (int64_t i = 0; i < d; i++) __builtin_prefetch(next + i * s, 1);          \
            }                                                                                 \
            for (int64_t i = 0; i < d; i++) head[i * s + offset] = from[i];                   \
        } else {                                                                              \
            memcpy(head + offset * d, from, d * sizeof(T));                                   \
        }                                                                                     \
    }                                                                                         \
}
DEFINE_STORE(store_2, uint16_t)
DEFINE_STORE(store_4, uint32_t)

/* `size`: bytes per element, 2 or 4 (raw copies: no value is changed). Kv heads are cut among
 * `threads` OpenMP threads: each head's slots are written by one thread, in token order. */
void store(const void *src, void *cache, const int64_t *slots, int64_t tokens, int64_t kv_heads,
           int64_t d, int64_t s, int64_t size, int64_t transposed, int64_t threads) {
    if (threads < 1 || tokens * kv_heads * d < (1 << 12)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < kv_heads; h++) {
        if (size == 2) store_2(src, cache, slots, tokens, h, kv_heads, d, s, transposed);
        else store_4(src, cache, slots, tokens, h, kv_heads, d, s, transposed);
    }
}

/* ------------------------------------------------------------------ bfloat16 linears on AMX
 *
 * out[m][n] = bfloat16(sum over k of x[m][k] * w_t[k][n]) on Intel's AMX tiles, in one order
 * of our own for every row, whatever the row count, the row's place or the thread count:
 * K is cut into chunks of AMX_CHUNK products (the last one shorter); each chunk's products are
 * summed by the tiles' dot-product instruction (TDPBF16PS) from zero, 32 k at a time in order of
 * k; the chunks' float32 partial sums are added in order; the total is rounded to bfloat16
 * (nearest even). Every output element is computed alone by that chain, so its bits depend only
 * on its row of x and its column of w_t. (oneDNN's AMX kernels sum in this order too for some
 * row counts and shapes; kernels/cpu.py uses such calls only where a proof saw them agree.)
 *
 * w_t is packed once (`amx_pack`) into the tiles' layout: for each block of 16 columns, for
 * each block of 32 k, 16 pairs of k by 16 columns (zero past K and N). x is packed per call
 * into tiles of 16 rows by 32 k. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_CHUNK 1024  /* products per partial sum (32 tile blocks) */
#define AMX_PREFETCH 4  /* k blocks ahead */
#define AMX_ROW_TILES 16  /* row tiles (of 16 rows) whose x stays in cache for every column */

int amx_ready(void) {  /* the process may use the tiles (Linux asks each process to request) */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                   18 /* XFEATURE_XTILEDATA */) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static void amx_configure(void) {  /* 8 tiles of 16 rows by 64 bytes */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

static int64_t blocks(int64_t n, int64_t size) { return (n + size - 1) / size; }

/* w_t [k][n] at w[kk * sk + nn * sn] -> packed [n / 16][k / 32][16][16][2] */
void amx_pack(const uint16_t *w, int64_t k, int64_t n, int64_t sk, int64_t sn, uint16_t *out,
              int64_t threads) {
    const int64_t kb = blocks(k, 32), nb = blocks(n, 16);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < nb; j++)
        for (int64_t b = 0; b < kb; b++) {
            uint16_t *tile = out + (j * kb + b) * 512;
            for (int p = 0; p < 16; p++)
                for (int c = 0; c < 16; c++)
                    for (int h = 0; h < 2; h++) {
                        const int64_t kk = b * 32 + 2 * p + h, nn = j * 16 + c;
                        tile[(p * 16 + c) * 2 + h] = kk < k && nn < n ? w[kk * sk + nn * sn] : 0;
                    }
        }
}

/* x [m][k] (row stride ldx) -> [m / 16][k / 32][16][32], zero past m and k */
static void amx_pack_rows(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, uint16_t *out,
                          int64_t threads) {
    const int64_t kb = blocks(k, 32), mt = blocks(m, 16);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < mt; t++)
        for (int64_t b = 0; b < kb; b++)
            for (int r = 0; r < 16; r++) {
                uint16_t *dst = out + ((t * kb + b) * 16 + r) * 32;
                const int64_t row = t * 16 + r, width = k - b * 32 < 32 ? k - b * 32 : 32;
                if (row < m) {
                    memcpy(dst, x + row * ldx + b * 32, width * 2);
                    memset(dst + width, 0, (32 - width) * 2);
                } else {
                    memset(dst, 0, 64);
                }
            }
}

static inline void amx_prefetch(const uint16_t *tile) {
    for (int q = 0; q < 16; q++) _mm_prefetch((const char *)(tile + q * 32), _MM_HINT_T0);
}

/* k blocks [lo, hi) of row tiles x0 (and x1) by column tiles w0 and w1, from zero, into c:
 * [x0 w0, x0 w1, x1 w0, x1 w1], 256 floats each. */
static void amx_chain(const uint16_t *x0, const uint16_t *x1, const uint16_t *w0,
                      const uint16_t *w1, int64_t lo, int64_t hi, int two_rows, float *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b = lo; b < hi; b++) {
        amx_prefetch(w0 + (b + AMX_PREFETCH) * 512);
        amx_prefetch(w1 + (b + AMX_PREFETCH) * 512);
        _tile_loadd(4, x0 + b * 512, 64);
        _tile_loadd(6, w0 + b * 512, 64);
        _tile_loadd(7, w1 + b * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_rows) {
            _tile_loadd(5, x1 + b * 512, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    if (two_rows) {
        _tile_stored(2, c + 512, 64);
        _tile_stored(3, c + 768, 64);
    }
}

/* c (16 x 16 floats) rounded to bfloat16 into out at (row0, col0), inside m x n */
static void amx_put(const float *c, int64_t row0, int64_t m, int64_t col0, int64_t n,
                    uint16_t *out, int64_t ldo) {
    const int64_t cols = n - col0 < 16 ? n - col0 : 16;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1);
    for (int r = 0; r < 16 && row0 + r < m; r++) {
        __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * 16));
        _mm256_mask_storeu_epi16(out + (row0 + r) * ldo + col0, mask, (__m256i)h);
    }
}

int amx_linear(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *packed,
               int64_t n, uint16_t *out, int64_t ldo, int64_t threads) {
    const int64_t kb = blocks(k, 32), mt = blocks(m, 16), nb = blocks(n, 16);
    const int64_t per_chunk = AMX_CHUNK / 32, pairs = blocks(nb, 2);
    uint16_t *rows = aligned_alloc(64, (size_t)mt * kb * 1024);
    if (rows == NULL) return -1;
    amx_pack_rows(x, m, k, ldx, rows, threads);
#pragma omp parallel num_threads(threads)
    {
        amx_configure();
        float sum[1024], part[1024];
        for (int64_t i0 = 0; i0 < mt; i0 += AMX_ROW_TILES) {
            const int64_t i1 = i0 + AMX_ROW_TILES < mt ? i0 + AMX_ROW_TILES : mt;
#pragma omp for schedule(static)
            for (int64_t j = 0; j < pairs; j++) {
                const int two_cols = 2 * j + 1 < nb;
                const uint16_t *w0 = packed + 2 * j * kb * 512;
                const uint16_t *w1 = two_cols ? w0 + kb * 512 : w0;
                for (int64_t i = i0; i < i1; i += 2) {
                    const int two_rows = i + 1 < i1;
                    const uint16_t *x0 = rows + i * kb * 512, *x1 = x0 + kb * 512;
                    const int used = two_rows ? 1024 : 512;
                    amx_chain(x0, x1, w0, w1, 0, per_chunk < kb ? per_chunk : kb, two_rows, sum);
                    for (int64_t lo = per_chunk; lo < kb; lo += per_chunk) {
                        amx_chain(x0, x1, w0, w1, lo, lo + per_chunk < kb ? lo + per_chunk : kb,
                                  two_rows, part);
                        for (int e = 0; e < used; e++) sum[e] += part[e];
                    }
                    for (int t = 0; t < (two_rows ? 4 : 2); t++)
                        if (two_cols || t % 2 == 0)
                            amx_put(sum + t * 256, (i + t / 2) * 16, m, (2 * j + t % 2) * 16, n,
                                    out, ldo);
                }
            }
        }
        _tile_release();
    }
    free(rows);
    return 0;
}
#else
int amx_ready(void) { return 0; }  /* no AMX in this build: kernels/cpu.py never calls these */
void amx_pack(const uint16_t *w, int64_t k, int64_t n, int64_t sk, int64_t sn, uint16_t *out,
              int64_t threads) { (void)w; (void)k; (void)n; (void)sk; (void)sn; (void)out;
                                  (void)threads; }
int amx_linear(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *packed,
               int64_t n, uint16_t *out, int64_t ldo, int64_t threads) {
    (void)x; (void)m; (void)k; (void)ldx; (void)packed; (void)n; (void)out; (void)ldo;
    (void)threads;
    return -1;
}
#endif
