/* Decode attention on CPU over a shared prompt cache: one query per row and head, over that row's prompt's keys
   and values (stored once per prompt) followed by its own completion's.

   For row r of prompt p(r) and head h (kv head g = h / (heads / kv_heads)):

       out[r, h] = sum_t softmax_t(scale q[r, h] . k_t) v_t

   over t in the prompt's positions [prompt_start[p(r)], prompt_length) and then the row's own [0, length). torch's
   CPU flash-attention kernel does one such span with two BLAS calls per row and head, which for one query are
   mostly call overhead; two spans would take two calls and a merge by their log-normalisers. Here each
   (row, kv head) is one straight pass over both spans with a running maximum (online softmax), so a step's
   attention costs about what reading the completions' keys and values costs: a prompt's are read by its G rows
   one after another and stay in cache. Built and loaded by decode_attention.py, which documents the contract. */

#include <float.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 256
#define MAX_DIM 512

typedef struct {
    float max, sum;  /* finite: the library is built with -ffast-math */
    float acc[MAX_DIM];
} Softmax;

/* Adds the positions [begin, end) of keys k and values v (consecutive positions `pos` floats apart). */
static void attend(Softmax *state, const float *restrict q, const float *k, const float *v, long pos, int begin,
                   int end, int dim, float scale) {
    float scores[BLOCK];
    for (int t0 = begin; t0 < end; t0 += BLOCK) {
        int n = end - t0 < BLOCK ? end - t0 : BLOCK;
        float block_max = -FLT_MAX;
        for (int b = 0; b < n; b++) {
            const float *key = k + (long)(t0 + b) * pos;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < dim; d++) dot += q[d] * key[d];
            scores[b] = dot * scale;
            block_max = scores[b] > block_max ? scores[b] : block_max;
        }
        float new_max = block_max > state->max ? block_max : state->max;
        float rescale = expf(state->max - new_max); /* what came before, to the new maximum */
        float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
        for (int b = 0; b < n; b++) {
            scores[b] = expf(scores[b] - new_max);
            block_sum += scores[b];
        }
        state->sum = state->sum * rescale + block_sum;
        for (int d = 0; d < dim; d++) state->acc[d] *= rescale;
        for (int b = 0; b < n; b++) {
            const float *value = v + (long)(t0 + b) * pos;
            float p = scores[b];
#pragma omp simd
            for (int d = 0; d < dim; d++) state->acc[d] += p * value[d];
        }
        state->max = new_max;
    }
}

/* Tensors as (pointer, strides); the last dim is contiguous everywhere.
   q[r, h, d] at q + r q_row + h q_head + d; head h reads kv head h / (heads / kv_heads).
   A cache holds the keys then the values: cache[x, j, t, d], j < kv_heads for keys, kv_heads + j for values.
   prompt_kv (prompts, 2 kv_heads, prompt_length, dim); prompt p's positions start at prompt_start[p] (int32).
   own_kv (places, 2 kv_heads, capacity, dim): row r's completion is place places[r] (int64), of prompt
   places[r] / g; length >= 1. new_kv[r, j, d] (NULL: none) is written at own position length - 1 first.
   out (rows, heads, dim) contiguous. */
void grpo_decode_attention(const float *q, long q_row, long q_head, const float *prompt_kv,
                           long prompt_row, long prompt_head, long prompt_pos, int prompt_length,
                           const int32_t *prompt_start, float *own_kv, long own_row, long own_head, long own_pos,
                           int length, const int64_t *places, int g, const float *new_kv, long new_row,
                           long new_head, float *out, int rows, int heads, int kv_heads, int dim, float scale,
                           int threads) {
    int group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < (long)rows * kv_heads; item++) {
        long r = item / kv_heads, j = item % kv_heads, place = places[r], prompt = place / g;
        float *own_k = own_kv + place * own_row + j * own_head, *own_v = own_k + kv_heads * own_head;
        if (new_kv) {
            const float *new_k = new_kv + r * new_row + j * new_head, *new_v = new_k + kv_heads * new_head;
            for (int d = 0; d < dim; d++) {
                own_k[(long)(length - 1) * own_pos + d] = new_k[d];
                own_v[(long)(length - 1) * own_pos + d] = new_v[d];
            }
        }
        for (int i = 0; i < group; i++) {
            long h = j * group + i;
            const float *query = q + r * q_row + h * q_head;
            Softmax state;
            state.max = -FLT_MAX;
            state.sum = 0.0f;
            for (int d = 0; d < dim; d++) state.acc[d] = 0.0f;
            const float *prompt_k = prompt_kv + prompt * prompt_row + j * prompt_head;
            attend(&state, query, prompt_k, prompt_k + kv_heads * prompt_head, prompt_pos, prompt_start[prompt],
                   prompt_length, dim, scale);
            attend(&state, query, own_k, own_v, own_pos, 0, length, dim, scale);
            float inverse = 1.0f / state.sum, *row_out = out + (r * heads + h) * dim;
            for (int d = 0; d < dim; d++) row_out[d] = state.acc[d] * inverse;
        }
    }
}
