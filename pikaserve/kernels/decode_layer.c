/* The front of a decoder layer in one call, for decode steps on the float32 CPU class.

Why: on the float32 class every matmul runs on the Q4 x int8 kernel (q4_matmul.c) and the
small ops on cpu_kernels.c, but each is a Python call that shapes tensors, allocates the
result and crosses ctypes: about fifteen per layer. A decode step's C work per layer is
~0.3 ms on a Zen 3 core, and the calls around it took about as long again. This file
strings a layer's calls together in C, from the residual stream to the gate/up projection:

  x' = x + pending, h = norm(x')                    (the previous layer's MLP output)
  qkv = h Wqkv; q, k = rope(q, k); cache[slots] = k, v
  attn = attention_rows(q); x'' = x' + attn Wo; h = norm(x''); gate_up = h Wgate_up

The caller keeps SiLU(gate) * up (torch's, as the unfused path) and the down projection, so
every value is computed by the same functions, in the same order, as the unfused layer in
model/llama.py: the same bits. The functions come as pointers from the two libraries
already loaded (kernels/decode_layer.py), so nothing here is compiled twice.

Every new token of the step is a query row of attention_rows (no prefill chunks), as in
decode steps and the verification of short drafts.
*/

#include <stdint.h>
#include <string.h>

typedef void (*NormFn)(const void *x, int64_t sx, const void *res, int64_t sres, const void *w,
                       void *sum, void *out, int64_t rows, int64_t width, float eps,
                       int64_t threads);
typedef void (*RotaryFn)(const void *qk, int64_t st, int64_t sh, const void *cos, int64_t sc,
                         const void *sin, int64_t ss, void *out, int64_t tokens, int64_t heads,
                         int64_t dim, int64_t threads);
typedef void (*AttentionFn)(const void *q, int64_t st, int64_t sh, const void *kc,
                            const void *vc, const int64_t *tables, int64_t ts,
                            const int64_t *tok, const int64_t *seq, const int64_t *len,
                            int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
                            int64_t bs, float scale, void *out, int64_t threads,
                            int64_t parallel);
typedef void (*MatmulFn)(const float *x, int64_t x_stride, const uint8_t *codes,
                         const float *scales, const float *mins, float *out,
                         int64_t out_stride, int64_t m, int64_t n, int64_t k, int64_t threads);

/* A matrix on the Q4 x int8 kernel: [n, k] as q4_matmul.c lays it out. */
typedef struct {
    const uint8_t *codes;
    const float *scales, *mins;
    int64_t n;
} Q4Weight;

/* What a layer holds: its norms' weights and its three matrices before the down projection. */
typedef struct {
    const float *input_norm, *post_norm;
    Q4Weight qkv, o, gate_up;
} Layer;

/* What every layer of a step shares: the functions, the shapes, the step's positions and
   attention rows, the thread counts the unfused calls would use, and scratch rows. */
typedef struct {
    NormFn norm;
    RotaryFn rotary;
    AttentionFn attention;
    MatmulFn matmul;
    int64_t rows, hidden, heads, kv_heads, head_dim, block_size;
    float eps, scale;
    const float *cos, *sin;
    int64_t cos_stride, sin_stride;
    const int64_t *slots, *block_tables;
    int64_t table_stride;
    const int64_t *row_tokens, *row_seqs, *row_lens;
    int64_t threads, norm_threads, rotary_threads, attention_parallel;
    float *mid, *h, *qkv, *qk, *attn, *o; /* [rows, hidden], ..., [rows, q + 2 kv], ... */
} Step;

/* x [rows, hidden] and pending (NULL in the first layer: the stream is x alone) in; out: the
   residual stream after attention (x_out [rows, hidden]) and the gate/up projection of its
   norm (gate_up [rows, gate_up n]). k_cache and v_cache: the layer's [blocks, block size,
   kv heads, head dim]. */
void decode_layer_front(const Layer *L, const Step *s, const float *x, const float *pending,
                        float *k_cache, float *v_cache, float *x_out, float *gate_up) {
    const int64_t rows = s->rows, hidden = s->hidden, dim = s->head_dim;
    const int64_t q_size = s->heads * dim, kv_size = s->kv_heads * dim;
    const int64_t qkv_n = q_size + 2 * kv_size, qk_heads = s->heads + s->kv_heads;
    const float *stream = x;
    if (pending) {
        s->norm(x, hidden, pending, hidden, L->input_norm, s->mid, s->h, rows, hidden, s->eps,
                s->norm_threads);
        stream = s->mid;
    } else {
        s->norm(x, hidden, NULL, 0, L->input_norm, NULL, s->h, rows, hidden, s->eps,
                s->norm_threads);
    }
    s->matmul(s->h, hidden, L->qkv.codes, L->qkv.scales, L->qkv.mins, s->qkv, qkv_n, rows,
              qkv_n, hidden, s->threads);
    /* queries and keys rotated together into qk [rows, heads + kv heads, dim] */
    s->rotary(s->qkv, qkv_n, dim, s->cos, s->cos_stride, s->sin, s->sin_stride, s->qk, rows,
              qk_heads, dim, s->rotary_threads);
    for (int64_t t = 0; t < rows; t++) {
        memcpy(k_cache + s->slots[t] * kv_size, s->qk + t * qk_heads * dim + q_size,
               sizeof(float) * (size_t)kv_size);
        memcpy(v_cache + s->slots[t] * kv_size, s->qkv + t * qkv_n + q_size + kv_size,
               sizeof(float) * (size_t)kv_size);
    }
    s->attention(s->qk, qk_heads * dim, dim, k_cache, v_cache, s->block_tables,
                 s->table_stride, s->row_tokens, s->row_seqs, s->row_lens, rows, s->heads,
                 s->kv_heads, dim, s->block_size, s->scale, s->attn, s->threads,
                 s->attention_parallel);
    s->matmul(s->attn, q_size, L->o.codes, L->o.scales, L->o.mins, s->o, hidden, rows, hidden,
              q_size, s->threads);
    s->norm(stream, hidden, s->o, hidden, L->post_norm, x_out, s->h, rows, hidden, s->eps,
            s->norm_threads);
    s->matmul(s->h, hidden, L->gate_up.codes, L->gate_up.scales, L->gate_up.mins, gate_up,
              L->gate_up.n, rows, L->gate_up.n, hidden, s->threads);
}
