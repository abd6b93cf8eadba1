/* CPU kernels with one fixed order of arithmetic per row: paged causal attention, row sums.
 *
 * A row (one query position of one head) is computed by one call of `row_group` from its query,
 * its position and the keys and values it sees, and nothing else: no other row, thread count,
 * vector width or CPU changes a bit. Only IEEE float32 adds, multiplies and divides are used,
 * each rounded on its own (built with -ffp-contract=off: no fused multiply-add), exp included
 * (`exp_fixed` below), so a vectorized loop and its scalar remainder give the same bits.
 *
 * For a row at position p with keys 0..p in splits of S keys (split j = cache block table[j]):
 *   s_k = sum over d, in order, of q[d] * K_k[d]     (q already scaled)
 *   m = max s_k;  w_k = exp(s_k - m), 0 where s_k - m <= -87
 *   l = sum over lanes t of (sum over splits j, in order, of w_{jS+t}), lanes added pairwise
 *   out[d] = (sum over k, in order, of w_k * V_k[d]) / l
 *
 * K blocks are stored transposed ([kv_heads][D][S] per block), V blocks as [kv_heads][S][D];
 * float32 or bfloat16 (widened exactly on load).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
#define MAX_D 512

static inline float load_f32(float x) { return x; }
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
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline void storev(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Scores of one query against `nb` (1 or 2) K blocks [d][s]: out[t] = sum over i, in order, of
 * q[i] * K[i][t]. Vector accumulators where s is a multiple of LANES (constant, see SHAPE);
 * two blocks at once keep twice the independent adds in flight. */
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
            const float qi = q[i];                                                            \
            for (int b = 0; b < nb; b++)                                                      \
                for (int64_t v = 0; v < nv; v++)                                              \
                    acc[b][v] = acc[b][v] + qi * loadv_##NAME(blocks[b] + i * s + v * LANES); \
        }                                                                                     \
        for (int b = 0; b < nb; b++)                                                          \
            for (int64_t v = 0; v < nv; v++) storev(outs[b] + v * LANES, acc[b][v]);          \
        return;                                                                               \
    }                                                                                         \
    for (int b = 0; b < nb; b++) {                                                            \
        float acc[MAX_S];                                                                     \
        for (int64_t t = 0; t < s; t++) acc[t] = 0.0f;                                        \
        for (int64_t i = 0; i < d; i++)                                                       \
            for (int64_t t = 0; t < s; t++) acc[t] = acc[t] + q[i] * LOAD(blocks[b][i * s + t]); \
        for (int64_t t = 0; t < s; t++) outs[b][t] = acc[t];                                  \
    }                                                                                         \
}                                                                                             \
/* out[i] += sum over t < n, in order, of w[t] * V[t][i], V [s][d]. */                        \
static inline __attribute__((always_inline)) void NAME##_values(                              \
        const float *restrict w, const T *restrict vb, int64_t n, float *restrict out,        \
        int64_t d) {                                                                          \
    if (d % LANES == 0 && d <= 16 * LANES) {                                                  \
        const int64_t nv = d / LANES;                                                         \
        vf acc[16];                                                                           \
        for (int64_t v = 0; v < nv; v++) acc[v] = loadv_f32(out + v * LANES);                 \
        for (int64_t t = 0; t < n; t++) {                                                     \
            const float wt = w[t];                                                            \
            for (int64_t v = 0; v < nv; v++)                                                  \
                acc[v] = acc[v] + wt * loadv_##NAME(vb + t * d + v * LANES);                  \
        }                                                                                     \
        for (int64_t v = 0; v < nv; v++) storev(out + v * LANES, acc[v]);                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t t = 0; t < n; t++)                                                           \
        for (int64_t i = 0; i < d; i++) out[i] = out[i] + w[t] * LOAD(vb[t * d + i]);        \
}

DEFINE_KERNELS(f32, float, load_f32)
DEFINE_KERNELS(bf16, uint16_t, load_bf16)

/* Weights w_k in place of the scores of one row (keys >= n masked), and their sum l. */
static float weights(float *sc, int64_t n, int64_t splits, int64_t s, float *lanes) {
    float m = sc[0];
    for (int64_t k = 1; k < n; k++) m = sc[k] > m ? sc[k] : m;
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

/* The g = heads / kv_heads query heads of kv head h at row r (they share every K/V block).
 * Inlined with d and s constant for the common shapes (same ops, same order, same bits). */
static inline __attribute__((always_inline)) void row_group_impl(
        const Args *a, int64_t r, int64_t h, float *sc, float *lanes, float *acc,
        const int64_t d, const int64_t s) {
    const int64_t g = a->heads / a->kv_heads;
    const int64_t n = a->pos[r] + 1, splits = (n + s - 1) / s;
    const int64_t *table = a->tables + r * a->table_stride;
    const float *q = a->q + (r * a->heads + h * g) * d;
    for (int64_t i = 0; i < g; i++) {
        for (int64_t j = 0; j < splits; j += 2) {
            const int nb = j + 1 < splits ? 2 : 1;
            float *outs[2] = {sc + i * splits * s + j * s, sc + i * splits * s + (j + 1) * s};
            int64_t at[2];
            for (int b = 0; b < nb; b++) at[b] = table[j + b] * a->block_stride + h * d * s;
            if (a->bf16) {
                const uint16_t *blocks[2] = {(const uint16_t *)a->k_cache + at[0],
                                             (const uint16_t *)a->k_cache + at[nb - 1]};
                bf16_scores(q + i * d, blocks, nb, outs, d, s);
            } else {
                const float *blocks[2] = {(const float *)a->k_cache + at[0],
                                          (const float *)a->k_cache + at[nb - 1]};
                f32_scores(q + i * d, blocks, nb, outs, d, s);
            }
        }
    }
    float l[g];
    for (int64_t i = 0; i < g; i++) l[i] = weights(sc + i * splits * s, n, splits, s, lanes);
    memset(acc, 0, sizeof(float) * g * d);
    for (int64_t j = 0; j < splits; j++) {
        const int64_t offset = table[j] * a->block_stride + h * s * d;
        const int64_t seen = n - j * s < s ? n - j * s : s;
        for (int64_t i = 0; i < g; i++) {
            const float *w = sc + i * splits * s + j * s;
            if (a->bf16)
                bf16_values(w, (const uint16_t *)a->v_cache + offset, seen, acc + i * d, d);
            else f32_values(w, (const float *)a->v_cache + offset, seen, acc + i * d, d);
        }
    }
    float *out = a->out + (r * a->heads + h * g) * d;
    for (int64_t i = 0; i < g; i++)
        for (int64_t k = 0; k < d; k++) out[i * d + k] = acc[i * d + k] / l[i];
}

#define SHAPE(D, S)                                                                           \
static void row_group_##D##_##S(const Args *a, int64_t r, int64_t h, float *sc, float *lanes, \
                                float *acc) {                                                \
    row_group_impl(a, r, h, sc, lanes, acc, D, S);                                           \
}
SHAPE(64, 16) SHAPE(64, 32) SHAPE(64, 64) SHAPE(128, 16) SHAPE(128, 32) SHAPE(128, 64)
SHAPE(256, 16) SHAPE(256, 32) SHAPE(256, 64)

static void row_group(const Args *a, int64_t r, int64_t h, float *sc, float *lanes,
                      float *acc) {
#define CASE(D, S) \
    if (a->d == D && a->s == S) return row_group_##D##_##S(a, r, h, sc, lanes, acc);
    CASE(64, 16) CASE(64, 32) CASE(64, 64) CASE(128, 16) CASE(128, 32) CASE(128, 64)
    CASE(256, 16) CASE(256, 32) CASE(256, 64)
#undef CASE
    row_group_impl(a, r, h, sc, lanes, acc, a->d, a->s);
}

/* Items lo..hi-1 are (kv head, row) pairs, kv-head-major: consecutive items share blocks while
 * they are in cache. Returns 0, or -1 where scratch memory ran out. */
static int run_items(const Args *a, int64_t lo, int64_t hi) {
    int64_t max_splits = 1;
    for (int64_t i = lo; i < hi; i++) {
        int64_t splits = a->pos[i % a->rows] / a->s + 1;
        max_splits = splits > max_splits ? splits : max_splits;
    }
    const int64_t g = a->heads / a->kv_heads;
    float *scratch = malloc(sizeof(float) * (a->s + g * a->d + g * max_splits * a->s));
    if (scratch == NULL) return -1;
    for (int64_t i = lo; i < hi; i++)
        row_group(a, i % a->rows, i / a->rows, scratch + a->s + g * a->d, scratch,
                  scratch + a->s);
    free(scratch);
    return 0;
}

/* Returns 0, or -1 where memory ran out. `bf16`: the caches hold bfloat16. Items are cut among
 * `threads` OpenMP threads (the process's own pool, torch's) at equal key counts, a row's cost;
 * which thread runs an item changes none of its bits. */
int attend(const float *q, const int64_t *pos, const int64_t *tables, int64_t table_stride,
           const void *k_cache, const void *v_cache, int64_t block_stride, int bf16,
           int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, int64_t s, float *out,
           int64_t threads) {
    const Args a = {q, pos, tables, table_stride, k_cache, v_cache, block_stride, bf16, rows,
                    heads, kv_heads, d, s, out};
    const int64_t items = rows * kv_heads;
    if (threads > items) threads = items;
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    int64_t bounds[257];
    double total = 0, done = 0;
    for (int64_t r = 0; r < rows; r++) total += (double)(pos[r] + 1) * kv_heads;
    bounds[0] = 0;
    for (int64_t t = 0, end = 0; t < threads; t++) {
        const double goal = total * (double)(t + 1) / (double)threads;
        while (end < items && (t == threads - 1 || done < goal)) done += pos[end++ % rows] + 1;
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

/* Each token's [kv_heads][d] values (contiguous, the cache's element size) into the cache at
 * slot = block * s + offset: K transposed ([block][kv_heads][d][s]) or V
 * ([block][kv_heads][s][d]). */
void store(const void *src, void *cache, const int64_t *slots, int64_t tokens, int64_t kv_heads,
           int64_t d, int64_t s, int64_t size, int64_t transposed) {
    const char *in = src;
    char *base = cache;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t block = slots[t] / s, offset = slots[t] % s;
        for (int64_t h = 0; h < kv_heads; h++) {
            const char *from = in + (t * kv_heads + h) * d * size;
            char *head = base + ((block * kv_heads + h) * d * s) * size;
            if (transposed) {
                for (int64_t i = 0; i < d; i++)
                    memcpy(head + (i * s + offset) * size, from + i * size, size);
            } else {
                memcpy(head + offset * d * size, from, d * size);
            }
        }
    }
}
