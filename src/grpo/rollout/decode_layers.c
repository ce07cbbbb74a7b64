/* A decode step's layers in one call: per layer the kernels of decode_linear.c and decode_attention.c with the
   rotary embedding between them, so a step crosses from Python into C once instead of about five times a layer
   (SmolLM2 at 16 rows: 34.4 -> 32.4 ms a step, `benchmarks/decode_step.py --linears`). Per layer:

       qkv = norm(x) Wqkv^T + b     (the norm's first factor in the kernel, its weight folded into W)
       q, k rotated: rotary pairs are adjacent, (a, b) -> (a c - b s, a s + b c), (c, s) the row's position's
       attended = attention(q, [prompt cache; own cache + the new k, v])
       x += attended Wo^T + b
       x += (silu(norm(x) Wg^T + bg) * (norm(x) Wu^T + bu)) Wd^T + bd

   Built and loaded by decode_layers.py, which documents the contract. */

#include <stdint.h>

int grpo_decode_linear(const float *x, long x_stride, const float *w, const float *bias, float *y, long y_stride,
                       int M, int K, int N, int epilogue, float norm_eps, int threads);
void grpo_decode_attention(const float *q, long q_row, long q_head, const float *prompt_kv, long prompt_row,
                           long prompt_head, long prompt_pos, int prompt_length, const int32_t *prompt_start,
                           float *own_kv, long own_row, long own_head, long own_pos, int length,
                           const int64_t *places, int g, const float *new_kv, long new_row, long new_head,
                           float *out, int rows, int heads, int kv_heads, int dim, float scale, int threads);

/* A layer's pointers, in this order: packed weights and biases (NULL: none), its prompt cache and own cache. */
enum { QKV, QKV_BIAS, O, O_BIAS, GATE_UP, GATE_UP_BIAS, DOWN, DOWN_BIAS, PROMPT_KV, OWN_KV, PER_LAYER };
enum { STORE, ADD, GATED_SILU };

/* x (rows, hidden) contiguous, updated in place. pointers (layers, PER_LAYER); norm_eps (layers, 2): the qkv and
   gate/up projections' norms. rotation (rows, dim / 2, 2): cos, sin. The caches' strides are every layer's.
   Scratch: qkv (rows, (heads + 2 kv_heads) dim), attended (rows, heads dim), gated (rows, intermediate).
   Returns 0, or 1 where the kernel found no memory (x then half updated). */
int grpo_decode_layers(int layers, float *const *pointers, const float *norm_eps, float *x, int rows, int hidden,
                       int heads, int kv_heads, int dim, int intermediate, const float *rotation, long prompt_row,
                       long prompt_head, long prompt_pos, int prompt_length, const int32_t *prompt_start,
                       long own_row, long own_head, long own_pos, int length, const int64_t *places, int g,
                       float scale, float *qkv, float *attended, float *gated, int threads) {
    int width = (heads + 2 * kv_heads) * dim, half = dim / 2;
    for (int i = 0; i < layers; i++) {
        float *const *p = pointers + (long)i * PER_LAYER;
        if (grpo_decode_linear(x, hidden, p[QKV], p[QKV_BIAS], qkv, width, rows, hidden, width, STORE,
                               norm_eps[2 * i], threads))
            return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r = 0; r < rows; r++) {
            const float *turn = rotation + (long)r * dim;
            for (int h = 0; h < heads + kv_heads; h++) {
                float *v = qkv + (long)r * width + (long)h * dim;
                for (int j = 0; j < half; j++) {
                    float a = v[2 * j], b = v[2 * j + 1], c = turn[2 * j], s = turn[2 * j + 1];
                    v[2 * j] = a * c - b * s;
                    v[2 * j + 1] = a * s + b * c;
                }
            }
        }
        grpo_decode_attention(qkv, width, dim, p[PROMPT_KV], prompt_row, prompt_head, prompt_pos, prompt_length,
                              prompt_start, p[OWN_KV], own_row, own_head, own_pos, length, places, g,
                              qkv + (long)heads * dim, width, dim, attended, rows, heads, kv_heads, dim, scale,
                              threads);
        grpo_decode_linear(attended, (long)heads * dim, p[O], p[O_BIAS], x, hidden, rows, heads * dim, hidden, ADD,
                           -1.0f, threads);
        if (grpo_decode_linear(x, hidden, p[GATE_UP], p[GATE_UP_BIAS], gated, intermediate, rows, hidden,
                               intermediate, GATED_SILU, norm_eps[2 * i + 1], threads))
            return 1;
        grpo_decode_linear(gated, intermediate, p[DOWN], p[DOWN_BIAS], x, hidden, rows, intermediate, hidden, ADD,
                           -1.0f, threads);
    }
    return 0;
}
