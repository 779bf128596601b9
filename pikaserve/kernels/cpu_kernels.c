/* Fused CPU kernels for the small ops of a decoder layer, and paged attention (query rows of
short sequences, and prefill chunks).

Why: a CPU decode step of a small model is ~35 eager PyTorch ops per layer around its four
matmuls, each a few microseconds of dispatch and allocation for a few hundred numbers, and
attention of one query row is a gather, two batched matmuls and a softmax with the same
overhead. These kernels do each group in one call (kernels/cpu_native.py compiles this file
with the machine's C compiler and calls it through ctypes). Prefill chunks, where SDPA ran
at ~100 GFLOP/s, get register-tiled products instead (attention_chunks, below).

Numerics follow kernels/fused.py (the Triton kernels) and the eager model: every value the
eager code rounds to the model dtype is rounded here too. Attention keeps scores and
probabilities in float32 and rounds only its output, as SDPA does.

Each kernel is written once with a constant `bf` (0: float32, 1: bfloat16 as raw uint16_t
bits), always inlined into its two exported versions, _f32 and _bf16, so the compiler
specialises and vectorises each. Tensors are row-major; strides are in elements.
*/

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM 256 /* head_dim */
#define INLINE static inline __attribute__((always_inline))

INLINE float load(const void *p, int64_t i, int bf) {
    if (!bf) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* nearest even, as torch */
    uint32_t nan = (u >> 16) | 0x40u;                           /* a NaN stays a quiet NaN */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

INLINE void store(void *p, int64_t i, float x, int bf) {
    if (bf)
        ((uint16_t *)p)[i] = to_bf16(x);
    else
        ((float *)p)[i] = x;
}

/* x as the model dtype would hold it */
INLINE float round_to(float x, int bf) {
    if (!bf) return x;
    uint32_t u = (uint32_t)to_bf16(x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* exp for float32, ~1 ulp, written so that the softmax loop vectorises */
INLINE float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* k = round(x / ln 2) by the 1.5 * 2^23 trick: floorf would not vectorise */
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The small ops below run their rows on `threads` OpenMP threads (1: the calling thread
   alone, which is faster for the few rows of a decode step than waking the others). Inside a
   parallel loop `bf` is no longer a constant (OpenMP passes it to the loop's own function), so
   each loop body picks its specialised row function itself. */

/* out = weight * rms_norm(s) with s = x, or s = x + residual (rounded, and written to sum) */
INLINE void rms_norm_row(const void *restrict x, const void *restrict residual,
                         const void *restrict weight, void *restrict sum, void *restrict out,
                         int64_t xo, int64_t ro, int64_t o, int64_t width, float eps, int bf) {
    float s[width];
    if (residual) {
        for (int64_t i = 0; i < width; i++) {
            float v = round_to(load(x, xo + i, bf) + load(residual, ro + i, bf), bf);
            store(sum, o + i, v, bf);
            s[i] = v;
        }
    } else {
        for (int64_t i = 0; i < width; i++) s[i] = load(x, xo + i, bf);
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < width; i++) squares += s[i] * s[i];
    float inv = 1.0f / sqrtf(squares / (float)width + eps);
    for (int64_t i = 0; i < width; i++)
        store(out, o + i, load(weight, i, bf) * round_to(s[i] * inv, bf), bf);
}

INLINE void rms_norm(const void *restrict x, int64_t stride_x, const void *restrict residual,
                     int64_t stride_res, const void *restrict weight, void *restrict sum,
                     void *restrict out, int64_t rows, int64_t width, float eps,
                     int64_t threads, int bf) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < rows; t++) {
        int64_t xo = t * stride_x, ro = t * stride_res, o = t * width;
        if (bf)
            rms_norm_row(x, residual, weight, sum, out, xo, ro, o, width, eps, 1);
        else
            rms_norm_row(x, residual, weight, sum, out, xo, ro, o, width, eps, 0);
    }
}

/* rotate-half RoPE of one token's heads */
INLINE void rotary_row(const void *restrict qk, int64_t x, int64_t stride_h,
                       const void *restrict cos, int64_t c, const void *restrict sin, int64_t s,
                       void *restrict out, int64_t o, int64_t heads, int64_t dim, int bf) {
    int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++, x += stride_h, o += dim) {
        for (int64_t d = 0; d < half; d++)
            store(out, o + d, load(qk, x + d, bf) * load(cos, c + d, bf)
                              + load(qk, x + d + half, bf) * load(sin, s + d, bf), bf);
        for (int64_t d = half; d < dim; d++)
            store(out, o + d, load(qk, x + d, bf) * load(cos, c + d, bf)
                              + load(qk, x + d - half, bf) * load(sin, s + d, bf), bf);
    }
}

/* rotate-half RoPE of qk [tokens, heads, dim] (strided) with per-token cos and signed sin
   tables [tokens, dim]; out is contiguous. Rounded once, like kernels/fused.py. */
INLINE void rotary(const void *restrict qk, int64_t stride_t, int64_t stride_h,
                   const void *restrict cos, int64_t stride_cos, const void *restrict sin,
                   int64_t stride_sin, void *restrict out, int64_t tokens, int64_t heads,
                   int64_t dim, int64_t threads, int bf) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < tokens; t++) {
        int64_t x = t * stride_t, c = t * stride_cos, s = t * stride_sin, o = t * heads * dim;
        if (bf)
            rotary_row(qk, x, stride_h, cos, c, sin, s, out, o, heads, dim, 1);
        else
            rotary_row(qk, x, stride_h, cos, c, sin, s, out, o, heads, dim, 0);
    }
}

/* Where key j of a sequence (KV head h) lies in a paged cache. The division is by a power of
   two in practice (block sizes 1-32), which the shift below serves without an integer divide. */
INLINE int64_t key_offset(const int64_t *table, int64_t j, int64_t block_size, int64_t kv_heads,
                          int64_t h, int64_t dim) {
    int64_t block, within;
    if ((block_size & (block_size - 1)) == 0) {
        int shift = __builtin_ctzll((unsigned long long)block_size);
        block = j >> shift;
        within = j & (block_size - 1);
    } else {
        block = j / block_size;
        within = j % block_size;
    }
    return ((table[block] * block_size + within) * kv_heads + h) * dim;
}

/* GCC's portable vector type: 16 floats (an AVX512 register) where AVX512 is on, else 8 (an
   AVX2 register, two NEON ones). 16 on AVX2 spilled a group's queries and accumulators out of
   its 16 registers: attention rows ran 3-5x slower than with 8. */
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef uint32_t vuint __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));
typedef uint16_t vhalf __attribute__((vector_size(2 * LANES)));
typedef float vfloat4 __attribute__((vector_size(16)));

INLINE vfloat vload(const void *p, int64_t i, int bf) {
    vfloat v;
    if (!bf) {
        memcpy(&v, (const float *)p + i, sizeof v);
        return v;
    }
    vhalf h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    vuint u = __builtin_convertvector(h, vuint) << 16;
    memcpy(&v, &u, sizeof v);
    return v;
}

INLINE float hsum(vfloat v) {
    vfloat4 parts[LANES / 4];
    memcpy(parts, &v, sizeof v);
    vfloat4 s = parts[0];
    for (int i = 1; i < LANES / 4; i++) s += parts[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* Each of a sequence's first `len` keys' offsets in the cache (KV head h), in a new array. */
INLINE int64_t *key_offsets(const int64_t *table, int64_t len, int64_t block_size,
                            int64_t kv_heads, int64_t h, int64_t dim) {
    int64_t *where = malloc(sizeof(int64_t) * len);
    for (int64_t j = 0; j < len; j++) where[j] = key_offset(table, j, block_size, kv_heads, h, dim);
    return where;
}

/* scores[j] = exp(scores[j] - top), in place; returns their sum. The sum runs in LANES
   partial sums: GCC 12 leaves an `omp simd` reduction scalar once this is inlined into a
   parallel loop, and a plain float sum does not vectorise without -ffast-math. */
INLINE float softmax_numerators(float *scores, int64_t len, float top) {
    for (int64_t j = 0; j < len; j++) scores[j] = exp_f32(scores[j] - top);
    vfloat partial = {0};
    int64_t j = 0;
    for (; j + LANES <= len; j += LANES) {
        vfloat v;
        memcpy(&v, scores + j, sizeof v);
        partial += v;
    }
    float sum = hsum(partial);
    for (; j < len; j++) sum += scores[j];
    return sum;
}

/* The largest of x[0:len], len > 0 (vectorised by hand, as the sum above). */
INLINE float largest(const float *x, int64_t len) {
    vfloat top;
    memcpy(&top, x, sizeof top); /* x has at least LANES floats (the packed widths do) */
    int64_t j = LANES;
    for (; j + LANES <= len; j += LANES) {
        vfloat v;
        memcpy(&v, x + j, sizeof v);
        vint above = v > top;
        top = (vfloat)(((vint)v & above) | ((vint)top & ~above));
    }
    float best = x[0];
    for (int i = 0; i < LANES && i < len; i++) best = top[i] > best ? top[i] : best;
    for (; j < len; j++) best = x[j] > best ? x[j] : best;
    return best;
}

/* One (row, KV head) task of attention_rows: the group of query heads at q_row + g * stride_h
   attend to `len` keys through `table`, written to out_row + g * dim. head_dim is `nv` vectors
   of LANES floats, a constant for the usual sizes once inlined, so a query head and its
   accumulators stay in registers while it runs over the keys (which stay in L1/L2 for the
   next head of the group). */
INLINE void attend(const void *restrict q, int64_t q_row, int64_t stride_h,
                   const void *restrict k_cache, const void *restrict v_cache,
                   const int64_t *table, int64_t len, int64_t group, int64_t h, int64_t kv_heads,
                   int64_t nv, int64_t block_size, float scale, void *restrict out,
                   int64_t out_row, int bf) {
    int64_t dim = nv * LANES;
    int64_t *where = key_offsets(table, len, block_size, kv_heads, h, dim);
    float *scores = malloc(sizeof(float) * len);
    for (int64_t g = 0; g < group; g++) {
        vfloat qv[MAX_DIM / LANES], acc[MAX_DIM / LANES];
        for (int64_t c = 0; c < nv; c++) qv[c] = vload(q, q_row + g * stride_h + c * LANES, bf);
        float top = -INFINITY;
        for (int64_t j = 0; j < len; j++) {
            vfloat dot = qv[0] * vload(k_cache, where[j], bf);
            for (int64_t c = 1; c < nv; c++) dot += qv[c] * vload(k_cache, where[j] + c * LANES, bf);
            scores[j] = hsum(dot) * scale;
            top = scores[j] > top ? scores[j] : top;
        }
        float total = softmax_numerators(scores, len, top);
        for (int64_t c = 0; c < nv; c++) acc[c] = (vfloat){0};
        for (int64_t j = 0; j < len; j++)
            for (int64_t c = 0; c < nv; c++)
                acc[c] += scores[j] * vload(v_cache, where[j] + c * LANES, bf);
        float inv = 1.0f / total;
        for (int64_t c = 0; c < nv; c++)
            for (int64_t i = 0; i < LANES; i++)
                store(out, out_row + g * dim + c * LANES + i, acc[c][i] * inv, bf);
    }
    free(scores);
    free(where);
}

/* attend() for a group of `group` query heads known at compile time: each key and value is
   loaded and widened once for the whole group, and the group's accumulators stay in
   registers (3 heads x 64 dims = 12 AVX512 registers). */
INLINE void attend_group(const void *restrict q, int64_t q_row, int64_t stride_h,
                         const void *restrict k_cache, const void *restrict v_cache,
                         const int64_t *table, int64_t len, int64_t group, int64_t h,
                         int64_t kv_heads, int64_t nv, int64_t block_size, float scale,
                         void *restrict out, int64_t out_row, int bf) {
    int64_t dim = nv * LANES;
    int64_t *where = key_offsets(table, len, block_size, kv_heads, h, dim);
    float *scores = malloc(sizeof(float) * group * len); /* [group][len] */
    vfloat qv[group][nv], acc[group][nv], row[nv];
    float top[group], total[group];
    for (int64_t g = 0; g < group; g++) {
        for (int64_t c = 0; c < nv; c++) qv[g][c] = vload(q, q_row + g * stride_h + c * LANES, bf);
        top[g] = -INFINITY;
    }
    for (int64_t j = 0; j < len; j++) {
        for (int64_t c = 0; c < nv; c++) row[c] = vload(k_cache, where[j] + c * LANES, bf);
        for (int64_t g = 0; g < group; g++) {
            vfloat dot = qv[g][0] * row[0];
            for (int64_t c = 1; c < nv; c++) dot += qv[g][c] * row[c];
            float s = hsum(dot) * scale;
            scores[g * len + j] = s;
            top[g] = s > top[g] ? s : top[g];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        total[g] = softmax_numerators(scores + g * len, len, top[g]);
        for (int64_t c = 0; c < nv; c++) acc[g][c] = (vfloat){0};
    }
    for (int64_t j = 0; j < len; j++) {
        for (int64_t c = 0; c < nv; c++) row[c] = vload(v_cache, where[j] + c * LANES, bf);
        for (int64_t g = 0; g < group; g++) {
            float p = scores[g * len + j];
            for (int64_t c = 0; c < nv; c++) acc[g][c] += p * row[c];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float inv = 1.0f / total[g];
        for (int64_t c = 0; c < nv; c++)
            for (int64_t i = 0; i < LANES; i++)
                store(out, out_row + g * dim + c * LANES + i, acc[g][c][i] * inv, bf);
    }
    free(scores);
    free(where);
}

/* attend_group() with the group size as a constant, for groups of up to 4 query heads per
   KV head (SmolLM2 3, Llama 3.x 4, Qwen3 2, no GQA 1); larger groups take attend(), one query
   head at a time. Each size is another copy to compile: eight took 11 s here, these four
   3.4 s. */
INLINE void attend_groups(const void *restrict q, int64_t q_row, int64_t stride_h,
                          const void *restrict k_cache, const void *restrict v_cache,
                          const int64_t *table, int64_t len, int64_t group, int64_t h,
                          int64_t kv_heads, int64_t nv, int64_t block_size, float scale,
                          void *restrict out, int64_t out_row, int bf) {
#define GROUP(G)                                                                                \
    case G:                                                                                     \
        attend_group(q, q_row, stride_h, k_cache, v_cache, table, len, G, h, kv_heads, nv,      \
                     block_size, scale, out, out_row, bf);                                      \
        return;
    switch (group) {
        GROUP(1) GROUP(2) GROUP(3) GROUP(4)
    }
#undef GROUP
    attend(q, q_row, stride_h, k_cache, v_cache, table, len, group, h, kv_heads, nv, block_size,
           scale, out, out_row, bf);
}

/* attend_groups() with the usual head sizes (64, 128) as constants. Called with a constant
   `bf` inside the parallel loop: OpenMP hands the loop's variables over at run time, so the
   dtype is chosen per task, not inherited as a constant. */
INLINE void attend_sized(const void *restrict q, int64_t q_row, int64_t stride_h,
                         const void *restrict k_cache, const void *restrict v_cache,
                         const int64_t *table, int64_t len, int64_t group, int64_t h,
                         int64_t kv_heads, int64_t nv, int64_t block_size, float scale,
                         void *restrict out, int64_t out_row, int bf) {
    if (nv == 64 / LANES)
        attend_groups(q, q_row, stride_h, k_cache, v_cache, table, len, group, h, kv_heads,
                      64 / LANES, block_size, scale, out, out_row, bf);
    else if (nv == 128 / LANES)
        attend_groups(q, q_row, stride_h, k_cache, v_cache, table, len, group, h, kv_heads,
                      128 / LANES, block_size, scale, out, out_row, bf);
    else
        attend(q, q_row, stride_h, k_cache, v_cache, table, len, group, h, kv_heads, nv,
               block_size, scale, out, out_row, bf);
}

/* Attention of query rows over a paged KV cache [blocks, block_size, kv_heads, dim]. Row r is
   token row_token[r] of q [T, heads, dim] (rows and heads strided) and of out [T, heads, dim];
   it sees the first row_len[r] keys of the sequence whose block table is tables[row_seq[r]].
   One task per (row, KV head) serves that head's group of query heads, so each key is read
   once per group. */
INLINE void attention_rows(const void *restrict q, int64_t stride_t, int64_t stride_h,
                           const void *restrict k_cache, const void *restrict v_cache,
                           const int64_t *tables, int64_t table_stride, const int64_t *row_token,
                           const int64_t *row_seq, const int64_t *row_len, int64_t rows,
                           int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                           float scale, void *restrict out, int64_t num_threads,
                           int64_t parallel, int bf) {
    int64_t group = heads / kv_heads;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic) if (parallel)
    for (int64_t task = 0; task < rows * kv_heads; task++) {
        int64_t r = task / kv_heads, h = task % kv_heads;
        const int64_t *table = tables + row_seq[r] * table_stride;
        int64_t q_row = row_token[r] * stride_t + h * group * stride_h;
        int64_t out_row = (row_token[r] * heads + h * group) * dim;
        if (bf)
            attend_sized(q, q_row, stride_h, k_cache, v_cache, table, row_len[r], group, h,
                         kv_heads, dim / LANES, block_size, scale, out, out_row, 1);
        else
            attend_sized(q, q_row, stride_h, k_cache, v_cache, table, row_len[r], group, h,
                         kv_heads, dim / LANES, block_size, scale, out, out_row, 0);
    }
}

/* ---- Attention of prefill chunks: tiled matrix products over packed keys and values ----

A chunk of n new tokens (query rows) attends to the sequence's ctx cached keys, row i to the
first ctx - n + i + 1 of them. Per row the work is the same as attend(), but with dozens of
rows per sequence the keys are worth repacking once per (chunk, KV head) as float32, keys
transposed [dim][keys] and values [keys][dim], so that scores and outputs are register-tiled
products: each loaded vector of keys or values serves TILE_M query heads and each broadcast
query element TILE_V vectors of keys, instead of a horizontal sum per score. The tile fills
AVX512's 32 registers (6 x 4 accumulators) or AVX2's 16 (6 x 2). */
#ifdef __AVX512F__
#define TILE_V 4
#else
#define TILE_V 2
#endif
#define TILE_M 6
#define TILE_N (TILE_V * LANES)
#define TASK_TILES 4 /* query tiles per task: small enough to balance one chunk over threads */

INLINE vfloat splat(float x) {
    return x - (vfloat){0}; /* x - 0 is x exactly (unlike x + 0 for -0): a plain broadcast */
}

/* c[m][0:nv * LANES] (+)= sum over k < depth of a[m * lda + k] * b[k * ldb + 0:nv * LANES] for
   m < mr (both constants once inlined: the accumulators stay in registers); `add` adds to c
   instead of overwriting it. */
INLINE void product_tile(const float *restrict a, int64_t lda, const float *restrict b,
                         int64_t ldb, int64_t depth, float *restrict c, int64_t ldc, int mr,
                         int nv, int add) {
    vfloat acc[TILE_M][TILE_V];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) {
            acc[m][v] = (vfloat){0};
            if (add) memcpy(&acc[m][v], c + m * ldc + v * LANES, sizeof(vfloat));
        }
    for (int64_t k = 0; k < depth; k++) {
        vfloat row[TILE_V];
        for (int v = 0; v < nv; v++) memcpy(&row[v], b + k * ldb + v * LANES, sizeof(vfloat));
        for (int m = 0; m < mr; m++) {
            vfloat x = splat(a[m * lda + k]);
            for (int v = 0; v < nv; v++) acc[m][v] += x * row[v];
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) memcpy(c + m * ldc + v * LANES, &acc[m][v], sizeof(vfloat));
}

/* product_tile() over columns [0, width) in tiles of TILE_N (width a multiple of LANES) for
   the mr rows of a query tile, mr a constant. */
INLINE void product_rows(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t depth,
                         float *c, int64_t ldc, int64_t width, int mr, int add) {
    int64_t col = 0;
    for (; col + TILE_N <= width; col += TILE_N)
        product_tile(a, lda, b + col, ldb, depth, c + col, ldc, mr, TILE_V, add);
    for (; col < width; col += LANES)
        product_tile(a, lda, b + col, ldb, depth, c + col, ldc, mr, 1, add);
}

INLINE void product(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t depth,
                    float *c, int64_t ldc, int64_t width, int64_t rows, int add) {
#define ROWS(M)                                                                                 \
    case M:                                                                                     \
        product_rows(a, lda, b, ldb, depth, c, ldc, width, M, add);                             \
        return;
    switch (rows) {
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
    }
#undef ROWS
}

/* A span of a sequence's keys and values (KV head h), packed as float32. */
typedef struct {
    float *keys_t; /* [dim][width]: the span's key j in column j, zero past its end */
    float *values; /* [len][dim] */
    int64_t width; /* the span's length rounded up to TILE_N */
} Packed;

INLINE int64_t tile_width(int64_t len) { return (len + TILE_N - 1) / TILE_N * TILE_N; }

/* Packs keys [first, first + len) of KV head h. */
INLINE void pack_keys_values(const void *restrict k_cache, const void *restrict v_cache,
                             const int64_t *table, int64_t first, int64_t len, int64_t block_size,
                             int64_t kv_heads, int64_t h, int64_t dim, Packed span, int bf) {
    for (int64_t j = 0; j < len; j++) {
        int64_t at = key_offset(table, first + j, block_size, kv_heads, h, dim);
        for (int64_t d = 0; d < dim; d++) span.keys_t[d * span.width + j] = load(k_cache, at + d, bf);
        for (int64_t d = 0; d < dim; d++) span.values[j * dim + d] = load(v_cache, at + d, bf);
    }
    for (int64_t d = 0; d < dim; d++)
        for (int64_t j = len; j < span.width; j++) span.keys_t[d * span.width + j] = 0.0f;
}

/* Query heads [first, first + count) of a chunk's (KV head h) list, ordered (row, head of the
   group): scores against the packed keys (the first `shared` from another chunk's `prefix`
   span, the rest from the chunk's `own`), softmax over each row's visible keys, output.
   `shared` is a multiple of TILE_N below every row's first new token. */
INLINE void attend_tile(const void *restrict q, int64_t stride_t, int64_t stride_h, Packed prefix,
                        int64_t shared, Packed own, int64_t start, int64_t n, int64_t ctx,
                        int64_t first, int64_t count, int64_t group, int64_t h, int64_t heads,
                        int64_t dim, float scale, float *queries, float *scores, int64_t width,
                        void *restrict out, int bf) {
    int64_t last_row = (first + count - 1) / group;
    int64_t len = ctx - n + last_row + 1; /* keys the tile's last row sees */
    int64_t cols = (len + LANES - 1) / LANES * LANES;
    for (int64_t m = 0; m < count; m++) {
        int64_t row = (first + m) / group, head = h * group + (first + m) % group;
        int64_t at = (start + row) * stride_t + head * stride_h;
        for (int64_t d = 0; d < dim; d++) queries[m * dim + d] = load(q, at + d, bf) * scale;
    }
    product(queries, dim, prefix.keys_t, prefix.width, dim, scores, width, shared, count, 0);
    product(queries, dim, own.keys_t, own.width, dim, scores + shared, width, cols - shared, count,
            0);
    float total[TILE_M];
    for (int64_t m = 0; m < count; m++) {
        float *s = scores + m * width;
        int64_t seen = ctx - n + (first + m) / group + 1;
        total[m] = softmax_numerators(s, seen, largest(s, seen));
        for (int64_t j = seen; j < len; j++) s[j] = 0.0f;
    }
    float acc[TILE_M * MAX_DIM];
    product(scores, width, prefix.values, dim, shared, acc, dim, dim, count, 0);
    product(scores + shared, width, own.values, dim, len - shared, acc, dim, dim, count,
            shared > 0);
    for (int64_t m = 0; m < count; m++) {
        int64_t row = (first + m) / group, head = h * group + (first + m) % group;
        int64_t at = ((start + row) * heads + head) * dim;
        float inv = 1.0f / total[m];
        for (int64_t d = 0; d < dim; d++) store(out, at + d, acc[m * dim + d] * inv, bf);
    }
}

/* For each chunk, an earlier chunk whose block table starts with the same blocks (prefix
   caching gives requests with the same prompt prefix the same blocks: Pika's concurrent
   turns all start with the 328 system-prompt keys) and how many keys they share, rounded
   down to TILE_N and below the chunk's new tokens; the chunk then packs only the rest.
   Roots (root[c] == c) share nothing and pack all their keys. */
INLINE void find_shared_prefixes(const int64_t *tables, int64_t table_stride, const int64_t *len,
                                 const int64_t *ctx, int64_t chunks, int64_t block_size,
                                 int64_t *root, int64_t *shared) {
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t *table = tables + c * table_stride;
        int64_t cached = ctx[c] - len[c];
        root[c] = c;
        shared[c] = 0;
        for (int64_t r = 0; r < c; r++) {
            if (root[r] != r) continue;
            const int64_t *other = tables + r * table_stride;
            int64_t limit = (cached < ctx[r] ? cached : ctx[r]) / block_size, same = 0;
            while (same < limit && table[same] == other[same]) same++;
            int64_t keys = same * block_size / TILE_N * TILE_N;
            if (keys > shared[c]) {
                root[c] = r;
                shared[c] = keys;
            }
        }
    }
}

/* Attention of prefill chunks over a paged KV cache [blocks, block_size, kv_heads, dim].
   Chunk c is tokens [start[c], start[c] + len[c]) of q [T, heads, dim] (rows and heads
   strided) and out [T, heads, dim]; its sequence has ctx[c] keys through block table row c.
   One parallel pass packs each (chunk, KV head)'s keys and values (those not shared with a
   root chunk), a second attends tiles of TASK_TILES x TILE_M query heads. Returns 0, or 1
   when its buffers (~8 bytes per key, dimension and KV head) could not be allocated. */
INLINE int64_t attention_chunks(const void *restrict q, int64_t stride_t, int64_t stride_h,
                             const void *restrict k_cache, const void *restrict v_cache,
                             const int64_t *tables, int64_t table_stride, const int64_t *start,
                             const int64_t *len, const int64_t *ctx, int64_t chunks,
                             int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                             float scale, void *restrict out, int64_t num_threads, int bf) {
    int64_t group = heads / kv_heads, pairs = chunks * kv_heads, per_task = TASK_TILES * TILE_M;
    int64_t *root = malloc(sizeof(int64_t) * chunks), *shared = malloc(sizeof(int64_t) * chunks);
    find_shared_prefixes(tables, table_stride, len, ctx, chunks, block_size, root, shared);
    int64_t *packed_at = malloc(sizeof(int64_t) * (pairs + 1));
    int64_t *task_at = malloc(sizeof(int64_t) * (pairs + 1));
    packed_at[0] = task_at[0] = 0;
    int64_t widest = 0;
    for (int64_t p = 0; p < pairs; p++) {
        int64_t c = p / kv_heads, own = ctx[c] - shared[c];
        packed_at[p + 1] = packed_at[p] + (tile_width(own) + own) * dim;
        task_at[p + 1] = task_at[p] + (len[c] * group + per_task - 1) / per_task;
        widest = tile_width(ctx[c]) > widest ? tile_width(ctx[c]) : widest;
    }
    float *packed = malloc(sizeof(float) * packed_at[pairs]);
    Packed *spans = malloc(sizeof(Packed) * pairs); /* each pair's own keys and values */
    int64_t failed = packed == NULL || spans == NULL;
    for (int64_t p = 0; p < pairs && !failed; p++) {
        int64_t width = tile_width(ctx[p / kv_heads] - shared[p / kv_heads]);
        spans[p] = (Packed){packed + packed_at[p], packed + packed_at[p] + width * dim, width};
    }
#pragma omp parallel num_threads(num_threads) if (!failed)
    {
        float *queries = malloc(sizeof(float) * TILE_M * dim);
        float *scores = malloc(sizeof(float) * TILE_M * widest);
        if (!queries || !scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#pragma omp for schedule(dynamic)
        for (int64_t p = 0; p < pairs; p++) {
            int64_t c = p / kv_heads;
            if (failed) continue;
            if (bf)
                pack_keys_values(k_cache, v_cache, tables + c * table_stride, shared[c],
                                 ctx[c] - shared[c], block_size, kv_heads, p % kv_heads, dim,
                                 spans[p], 1);
            else
                pack_keys_values(k_cache, v_cache, tables + c * table_stride, shared[c],
                                 ctx[c] - shared[c], block_size, kv_heads, p % kv_heads, dim,
                                 spans[p], 0);
        }
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < task_at[pairs]; t++) {
            if (failed) continue;
            int64_t p = 0, past = pairs; /* the pair of task t: task_at[p] <= t < task_at[p + 1] */
            while (past - p > 1) {
                int64_t mid = (p + past) / 2;
                if (task_at[mid] <= t) p = mid;
                else past = mid;
            }
            int64_t c = p / kv_heads, h = p % kv_heads;
            Packed own = spans[p], prefix = spans[root[c] * kv_heads + h];
            int64_t first = (t - task_at[p]) * per_task, end = first + per_task;
            end = end < len[c] * group ? end : len[c] * group;
            for (int64_t m = first; m < end; m += TILE_M) {
                int64_t count = end - m < TILE_M ? end - m : TILE_M;
                if (bf)
                    attend_tile(q, stride_t, stride_h, prefix, shared[c], own, start[c], len[c],
                                ctx[c], m, count, group, h, heads, dim, scale, queries, scores,
                                tile_width(ctx[c]), out, 1);
                else
                    attend_tile(q, stride_t, stride_h, prefix, shared[c], own, start[c], len[c],
                                ctx[c], m, count, group, h, heads, dim, scale, queries, scores,
                                tile_width(ctx[c]), out, 0);
            }
        }
        free(queries);
        free(scores);
    }
    free(packed);
    free(spans);
    free(packed_at);
    free(task_at);
    free(root);
    free(shared);
    return failed;
}

/* The exported versions: name_f32 and name_bf16 */
#define EXPORT(name, params, ...)                         \
    void name##_f32 params { name(__VA_ARGS__, 0); }     \
    void name##_bf16 params { name(__VA_ARGS__, 1); }

#define EXPORT_STATUS(name, params, ...)                  \
    int64_t name##_f32 params { return name(__VA_ARGS__, 0); } \
    int64_t name##_bf16 params { return name(__VA_ARGS__, 1); }

#define P const void *
EXPORT(rms_norm,
       (P x, int64_t sx, P res, int64_t sres, P w, void *sum, void *out, int64_t rows,
        int64_t width, float eps, int64_t threads),
       x, sx, res, sres, w, sum, out, rows, width, eps, threads)
EXPORT(rotary,
       (P qk, int64_t st, int64_t sh, P cos, int64_t sc, P sin, int64_t ss, void *out,
        int64_t tokens, int64_t heads, int64_t dim, int64_t threads),
       qk, st, sh, cos, sc, sin, ss, out, tokens, heads, dim, threads)
EXPORT(attention_rows,
       (P q, int64_t st, int64_t sh, P kc, P vc, const int64_t *tables, int64_t ts,
        const int64_t *tok, const int64_t *seq, const int64_t *len, int64_t rows, int64_t heads,
        int64_t kv_heads, int64_t dim, int64_t bs, float scale, void *out, int64_t threads,
        int64_t parallel),
       q, st, sh, kc, vc, tables, ts, tok, seq, len, rows, heads, kv_heads, dim, bs, scale, out,
       threads, parallel)

EXPORT_STATUS(attention_chunks,
       (P q, int64_t st, int64_t sh, P kc, P vc, const int64_t *tables, int64_t ts,
        const int64_t *start, const int64_t *len, const int64_t *ctx, int64_t chunks,
        int64_t heads, int64_t kv_heads, int64_t dim, int64_t bs, float scale, void *out,
        int64_t threads),
       q, st, sh, kc, vc, tables, ts, start, len, ctx, chunks, heads, kv_heads, dim, bs, scale,
       out, threads)

int64_t max_dim(void) { return MAX_DIM; }
int64_t dim_multiple(void) { return LANES; }
