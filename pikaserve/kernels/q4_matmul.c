/* float32 rows times 4-bit GGUF weights in integer arithmetic, for x86 CPUs with AVX2.

Why: without native bfloat16 (AVX2 CPUs, AVX512 without BF16) the model runs float32 matmuls,
and a Pika prefill of ~50 rows is compute-bound on them: an AVX2 core does 16 float
multiply-adds per cycle. vpmaddubsw does 32 byte multiplies per instruction, so the same work
in 8-bit integers takes about half the instructions (vpdpbusd, where the CPU has VNNI, fewer
still), and a pass over a few rows reads the weights' 4-bit codes, an eighth of float32's
bytes.

What it computes, exactly: the weights are the GGUF's own (Q4_0, Q4_1, Q4_K: per group of
32 along K, w = scale * q + minimum, q in 0..15). Each row of x is quantized per group of 32
to int8 with one float scale (as llama.cpp's Q8 activations), so
  y[i, j] = sum over groups g of  d[i,g] * (scale[j,g] * sum_k q[j,k] * a[i,k]
                                            + minimum[j,g] * sum_k a[i,k])
with a[i,k] = round(x[i,k] / d[i,g]) in -127..127. The codes are unsigned and small, so
vpmaddubsw's int16 pair sums (at most 2 * 15 * 127) add up over a whole group without
saturating (8 of them: 30480 < 32767): exact integer dot products, one conversion per group.

q8_matmul below is its 8-bit sibling, for an LM head's int8 codes.

Layouts (model/q4_int8_weights.py packs them):
  codes   [N / 8][K / 8][32] bytes: tile of 8 output channels, step of 8 along K; byte
          4 * c + j holds channel c's code at k = 8t + j in its low nibble, 8t + 4 + j high
  scales  [N / 8][K / 32][8] float, minimums the same
  x       [M, K] float32, rows strided; out [M, N] float32, rows strided
*/

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define TILE 8
#define MAX_ROWS_AT_ONCE 4
#define ROW_BLOCK 32 /* rows whose int8 codes stay in cache while a thread walks its tiles */
#define INLINE static inline __attribute__((always_inline))
/* An empty asm that takes a running sum in a register and gives it back: GCC may then not
   reassociate the integer sums of a group, which it otherwise turns into trees of spilled
   partial products (1.3-1.45x slower on a Zen 3 core; results are the same bits). */
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))

/* With VNNI (AVX512-VNNI, or AVX-VNNI on client CPUs) one vpdpbusd multiplies the byte pairs
   and adds them into int32 lanes; without it, vpmaddubsw's int16 pair sums add up in int16
   over a group and are widened once (vpmaddwd with ones). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#define DOT_BYTES(acc, w, a) _mm256_dpbusd_epi32(acc, w, a)
#elif defined(__AVXVNNI__)
#define VNNI 1
#define DOT_BYTES(acc, w, a) _mm256_dpbusd_avx_epi32(acc, w, a)
#else
#define VNNI 0
#define DOT_BYTES(acc, w, a) _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a))
#endif

/* One row's groups of 32 to int8 codes, each group's scale, and scale * sum of codes. */
static void quantize_row(const float *x, int64_t k, int8_t *codes, float *scale, float *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < k / GROUP; g++) {
        const float *p = x + g * GROUP;
        __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
        __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f;
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* round to nearest even (the default rounding mode), as torch.round */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        /* the packs work within 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(codes + g * GROUP), _mm256_permutevar8x32_epi32(packed, order));
        scale[g] = d;
        sums[g] = d * (float)_mm_cvtsi128_si32(t);
    }
}

/* Rows quantized by quantize_row: codes [m, k], and per group a scale and scale * code sum. */
typedef struct {
    int8_t *a;
    float *d, *sums;
} QuantizedRows;

static QuantizedRows quantized_rows(int64_t m, int64_t k) {
    QuantizedRows q;
    q.a = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    q.d = malloc(sizeof(float) * (size_t)(m * (k / GROUP)) * 2);
    if (!q.a || !q.d) abort();
    q.sums = q.d + m * (k / GROUP);
    return q;
}

static void free_rows(QuantizedRows q) {
    free(q.a);
    free(q.d);
}

INLINE __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* The 8-bit sibling (q8_matmul) takes weights with signed int8 codes (-127..127) and a
   scale per group of 32 (an LM head, requantized as Q8_0): y[i, j] = sum over g of d[i,g] *
   scale[j,g] * sum_k q[j,k] * a[i,k]. Both operands are signed there, so each product goes
   through the sign trick (|a| times q with a's sign), whose pair sums (at most 2 * 127 * 127)
   fit int16 but not two of them: every step widens to int32.
   Layouts: codes [N / 8][K / 4][32] int8, byte 4 * c + j = channel c's code at k = 4t + j;
   scales [N / 8][K / 32][8] float. */
INLINE __m256i dot_signed(__m256i acc, __m256i w, __m256i a, __m256i ones) {
    __m256i magnitude = _mm256_sign_epi8(a, a), signed_w = _mm256_sign_epi8(w, a);
#if VNNI
    (void)ones;
    return DOT_BYTES(acc, magnitude, signed_w);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_w), ones));
#endif
}

/* `rows` rows times one tile of 8 output channels, for 4-bit or 8-bit codes (`bits` and
   `rows` constants after inlining). Each row is summed alone, in the same order at any row
   count. */
INLINE void tile_rows(int bits, int rows, const void *codes, const float *scales,
                      const float *mins, const int8_t *a, int64_t k, const float *d,
                      const float *sums, float *out, int64_t out_stride) {
    const int64_t groups = k / GROUP;
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *bytes = codes;
    __m256 acc[MAX_ROWS_AT_ONCE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i dot[MAX_ROWS_AT_ONCE];
        for (int r = 0; r < rows; r++) dot[r] = _mm256_setzero_si256();
        const int8_t *ag = a + g * GROUP;
        if (bits == 4) {
            for (int t = 0; t < GROUP / 8; t++) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)(bytes + (g * 4 + t) * 32));
                __m256i w0 = _mm256_and_si256(packed, low);
                __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int r = 0; r < rows; r++) {
                    dot[r] = DOT_BYTES(dot[r], w0, broadcast4(ag + r * k + t * 8));
                    KEEP_IN_REGISTER(dot[r]);
                    dot[r] = DOT_BYTES(dot[r], w1, broadcast4(ag + r * k + t * 8 + 4));
                    KEEP_IN_REGISTER(dot[r]);
                }
            }
        } else {
            for (int t = 0; t < GROUP / 4; t++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(bytes + (g * 8 + t) * 32));
                for (int r = 0; r < rows; r++) {
                    dot[r] = dot_signed(dot[r], w, broadcast4(ag + r * k + t * 4), ones);
                    KEEP_IN_REGISTER(dot[r]);
                }
            }
        }
        __m256 sc = _mm256_loadu_ps(scales + g * TILE);
        for (int r = 0; r < rows; r++) {
            /* without VNNI the 4-bit sums are still int16 pairs */
            __m256i whole = bits == 4 && !VNNI ? _mm256_madd_epi16(dot[r], ones) : dot[r];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(whole),
                                     _mm256_mul_ps(sc, _mm256_set1_ps(d[r * groups + g])), acc[r]);
            if (bits == 4)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(mins + g * TILE),
                                         _mm256_set1_ps(sums[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

/* tile_rows() for 1 to 4 rows, each count compiled with it as a constant. */
INLINE void tile_block(int bits, int64_t rows, const void *codes, const float *scales,
                       const float *mins, const int8_t *a, int64_t k, const float *d,
                       const float *sums, float *out, int64_t out_stride) {
    switch (rows) {
    case 4: tile_rows(bits, 4, codes, scales, mins, a, k, d, sums, out, out_stride); break;
    case 3: tile_rows(bits, 3, codes, scales, mins, a, k, d, sums, out, out_stride); break;
    case 2: tile_rows(bits, 2, codes, scales, mins, a, k, d, sums, out, out_stride); break;
    default: tile_rows(bits, 1, codes, scales, mins, a, k, d, sums, out, out_stride); break;
    }
}

/* y = x W^T for x [m, k] (row stride x_stride) and W as 4-bit (bits 4: codes, scales and
   minimums as laid out at the top) or 8-bit codes (bits 8: codes and scales as above q8),
   y [m, n] (row stride out_stride). k a multiple of 32, n of 8. On `threads` OpenMP threads:
   rows are quantized in parallel, then tiles of output channels are shared out. */
static void matmul(int bits, const float *x, int64_t x_stride, const void *codes,
                   const float *scales, const float *mins, float *out, int64_t out_stride,
                   int64_t m, int64_t n, int64_t k, int64_t threads) {
    const int64_t groups = k / GROUP;
    QuantizedRows q = quantized_rows(m, k);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++)
            quantize_row(x + i * x_stride, k, q.a + i * k, q.d + i * groups, q.sums + i * groups);
        /* Each thread takes a fixed share of the tiles and walks them once per block of
           ROW_BLOCK rows, which stay in L1 or L2 (18-48 KB of int8 codes for K = 576-1536)
           while the share's codes stream by. Tile by tile over all rows, a 16-client Pika
           prefill's ~1,200 rows no longer fit L2: ~100 against ~118 GMAC/s on Zen 3 at
           1,280 rows (same bits). */
        const int64_t tiles = n / TILE, parts = omp_get_num_threads(), part = omp_get_thread_num();
        const int64_t first = tiles * part / parts, last = tiles * (part + 1) / parts;
        for (int64_t block = 0; block < m; block += ROW_BLOCK) {
            const int64_t block_end = m - block < ROW_BLOCK ? m : block + ROW_BLOCK;
            for (int64_t tile = first; tile < last; tile++) {
                const float *sc = scales + tile * groups * TILE;
                for (int64_t i = block; i < block_end; i += MAX_ROWS_AT_ONCE) {
                    int64_t rows = block_end - i < MAX_ROWS_AT_ONCE ? block_end - i : MAX_ROWS_AT_ONCE;
                    float *o = out + tile * TILE + i * out_stride;
                    /* a tile is 4k bytes of 4-bit codes, 8k of 8-bit ones */
                    const uint8_t *c = (const uint8_t *)codes + tile * (k / 8) * bits * 8;
                    const float *mn = bits == 4 ? mins + tile * groups * TILE : NULL;
                    /* bits as a constant in each call: its branches compile away */
                    if (bits == 4)
                        tile_block(4, rows, c, sc, mn, q.a + i * k, k, q.d + i * groups,
                                   q.sums + i * groups, o, out_stride);
                    else
                        tile_block(8, rows, c, sc, mn, q.a + i * k, k, q.d + i * groups,
                                   q.sums + i * groups, o, out_stride);
                }
            }
        }
    }
    free_rows(q);
}

void q4_matmul(const float *x, int64_t x_stride, const uint8_t *codes, const float *scales,
               const float *mins, float *out, int64_t out_stride, int64_t m, int64_t n, int64_t k,
               int64_t threads) {
    matmul(4, x, x_stride, codes, scales, mins, out, out_stride, m, n, k, threads);
}

void q8_matmul(const float *x, int64_t x_stride, const int8_t *codes, const float *scales,
               float *out, int64_t out_stride, int64_t m, int64_t n, int64_t k,
               int64_t threads) {
    matmul(8, x, x_stride, codes, scales, NULL, out, out_stride, m, n, k, threads);
}

int64_t uses_vnni(void) { return VNNI; }
