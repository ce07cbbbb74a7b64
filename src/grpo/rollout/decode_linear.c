/* The linear layers of a CPU decode step: y = x W^T (+ b) for the few rows of a step (M <= ~32) and a weight
   streamed from memory, since a model's weights do not fit in the CPU's caches.

   At a step's few rows a linear is neither purely compute- nor memory-bound: it streams each weight once, doing
   M multiply-adds per weight. oneDNN's and BLAS's kernels stall on that stream (measured on a 2-core CPU: about
   14 GB/s of a 33 GB/s memory, 100-140 of a 190 GFLOP/s peak). Here W is packed in blocks of LANES outputs,
   (N / LANES, K, LANES): a block is one sequential stream, fetched ahead with software prefetch. Up to 16 rows a
   thread takes one output block (a gate and up pair) at a time, and each 64-byte line of it meets all rows'
   broadcast inputs in registers (a 16 x LANES tile of accumulators). With more rows (AVX-512) a thread takes a
   group of GROUP adjacent blocks (3, or 4 for gate and up pairs) and each k's 3 lines meet 8 rows' inputs a pass
   (a 3 x 8 tile), so a line of weight meets more rows than it costs loads of inputs: SmolLM2's decode step
   (`benchmarks/decode_step.py --linears --size smollm2`, the layers in one call) at 32 rows 57 -> 51-52 ms, at 64
   rows 95-102 -> 77 ms against 16-row passes of one block.

   Epilogues save the step separate passes over its activations:
       0  y = x W^T + b
       1  y += x W^T + b            (the residual stream, in place)
       2  y = silu(x Wg^T + bg) * (x Wu^T + bu)   (a gated MLP's gate and up projections: W holds their blocks
                                                   interleaved, gate block j then up block j; N counts one of them)

   With `norm_eps` >= 0 each row of x is first scaled by 1 / sqrt(|x_m|^2 + norm_eps): an RMSNorm whose weight (and
   sqrt(K)) is folded into W (decoder.py's FoldedRMSNorm), applied to the product, so the norm costs no pass of
   its own.

   Every output is summed by one thread over k in order, whatever M and the number of threads: a row's result does
   not depend on the other rows of the batch (tested). Built and loaded by cpu_kernels.py; called by
   decode_linear.py, which documents the contract. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#define GROUP 3        /* packed blocks multiplied together; a gated MLP's group is GATED_GROUP (gate, up pairs) */
#define GATED_GROUP 4
#else
#define LANES 8
#define GROUP 1 /* AVX2: one block by 8 rows at a time (a gate and up pair for the gated MLP) */
#define GATED_GROUP 2
#endif
#define PREFETCH_LINES(NB) ((NB) == 1 ? 96 : 32) /* lines ahead: ~6 KB in a block's stream, 2 KB in a group's */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[b * out_stride + m] = sum_k x[m, k] w_b[k, :] for NB packed blocks w_b (`block_stride` floats apart) and R
   rows, both compile-time constants, so the NB x R accumulators stay in registers. Each k loads NB lines of the
   weight and R inputs for NB R multiply-adds: at 3 x 8 the loads no longer outnumber the multiply-adds, as they
   do in a 1 x 16 tile (a scratch C benchmark, 16 rows, a 3.5 MB weight in cache: 1 x 16 292 GFLOP/s, 3 x 8 337). */
#define TILE(NB, R)                                                                                          \
    static void tile_##NB##_##R(const float *restrict x, long x_stride, const float *restrict w,             \
                                long block_stride, int K, vec *restrict out, int out_stride) {               \
        vec acc[NB][R];                                                                                      \
        for (int b = 0; b < NB; b++)                                                                         \
            for (int m = 0; m < R; m++) acc[b][m] = (vec){0};                                                \
        for (int k = 0; k < K; k++) {                                                                        \
            vec wk[NB];                                                                                      \
            for (int b = 0; b < NB; b++) {                                                                   \
                const float *line = w + b * block_stride + (long)k * LANES;                                  \
                __builtin_prefetch(line + PREFETCH_LINES(NB) * LANES, 0, 1);                                 \
                wk[b] = load(line);                                                                          \
            }                                                                                                \
            for (int m = 0; m < R; m++) {                                                                    \
                float xm = x[m * x_stride + k];                                                              \
                for (int b = 0; b < NB; b++) acc[b][m] += xm * wk[b];                                        \
            }                                                                                                \
        }                                                                                                    \
        for (int b = 0; b < NB; b++)                                                                         \
            for (int m = 0; m < R; m++) out[b * out_stride + m] = acc[b][m];                                 \
    }
#define TILES_OF(NB) TILE(NB, 1) TILE(NB, 2) TILE(NB, 3) TILE(NB, 4) TILE(NB, 5) TILE(NB, 6) TILE(NB, 7) TILE(NB, 8)
#define TABLE_OF(NB) {NULL, tile_##NB##_1, tile_##NB##_2, tile_##NB##_3, tile_##NB##_4, tile_##NB##_5,            \
                      tile_##NB##_6, tile_##NB##_7, tile_##NB##_8}
typedef void (*tile_fn)(const float *, long, const float *, long, int, vec *, int);
TILES_OF(1)
#if LANES == 16
#define SINGLE_ROWS 16
TILE(1, 9) TILE(1, 10) TILE(1, 11) TILE(1, 12) TILE(1, 13) TILE(1, 14) TILE(1, 15) TILE(1, 16)
static const tile_fn single_tiles[SINGLE_ROWS + 1] = {
    NULL, tile_1_1, tile_1_2, tile_1_3, tile_1_4, tile_1_5, tile_1_6, tile_1_7, tile_1_8,
    tile_1_9, tile_1_10, tile_1_11, tile_1_12, tile_1_13, tile_1_14, tile_1_15, tile_1_16};
TILES_OF(2) TILES_OF(3) TILES_OF(4)
static const tile_fn group_tiles[5][9] = {{NULL}, TABLE_OF(1), TABLE_OF(2), TABLE_OF(3), TABLE_OF(4)};
static const int group_tile_rows[5] = {0, 8, 8, 8, 6}; /* 16 to 24 accumulators */
#else
#define SINGLE_ROWS 8 /* 8 accumulators of AVX2's 16 registers */
static const tile_fn single_tiles[SINGLE_ROWS + 1] = TABLE_OF(1);
#endif

/* out[b * out_stride + m] for `rows` rows of NB packed blocks. Up to SINGLE_ROWS rows, each block is multiplied by
   all of them in one pass: a step whose rows are not a power of two (rows leave as their completions end) passes
   over a block no more often than needed (SmolLM2's layers at 14 rows, a scratch C benchmark: 23.8 ms a step in
   passes of 8, 4 and 2 rows, 20.2 ms in one). There a step waits on memory, and groups of 8 rows cost a second
   pass: `--size small`, cached weights, 14 and 15 rows, 10-15% slower. More rows, where the multiply-adds
   count, go through the whole group 8 rows a pass (6 for 4 blocks), the blocks read from cache after the first. */
static void group_rows(const float *x, long x_stride, const float *w, long block_stride, int K, int NB, int rows,
                       vec *out, int out_stride) {
#if LANES == 16
    if (rows > SINGLE_ROWS) {
        for (int m = 0; m < rows; m += group_tile_rows[NB]) {
            int r = rows - m < group_tile_rows[NB] ? rows - m : group_tile_rows[NB];
            group_tiles[NB][r](x + m * x_stride, x_stride, w, block_stride, K, out + m, out_stride);
        }
        return;
    }
#endif
    for (int b = 0; b < NB; b++)
        for (int m = 0; m < rows; m += SINGLE_ROWS) {
            int r = rows - m < SINGLE_ROWS ? rows - m : SINGLE_ROWS;
            single_tiles[r](x + m * x_stride, x_stride, w + b * block_stride, block_stride, K,
                            out + b * out_stride + m, out_stride);
        }
}

int grpo_decode_linear_lanes(void) { return LANES; }

#define ROW_CHUNK 64 /* rows per pass over a block: bounds the stack buffers */

/* x (M, K) rows `x_stride` floats apart; w packed (blocks, K, LANES); bias (blocks * LANES) in the packed order or
   NULL; y (M, N) rows `y_stride` apart; N outputs (per half, epilogue 2); norm_eps < 0: no norm. Returns 0, or 1
   where memory for the norms could not be had (nothing written). */
int grpo_decode_linear(const float *x, long x_stride, const float *w, const float *bias, float *y, long y_stride,
                        int M, int K, int N, int epilogue, float norm_eps, int threads) {
    int blocks = (N + LANES - 1) / LANES;
    int per_output = epilogue == 2 ? 2 : 1; /* packed blocks per output block */
    float *row_scale = NULL;
    if (norm_eps >= 0.0f && M > 0) {
        row_scale = malloc(sizeof(float) * (size_t)M);
        if (!row_scale) return 1;
        for (int m = 0; m < M; m++) {
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int k = 0; k < K; k++) squares += x[m * x_stride + k] * x[m * x_stride + k];
            row_scale[m] = 1.0f / sqrtf(squares + norm_eps);
        }
    }
    /* a thread's share: an output block (a gate and up pair) each up to SINGLE_ROWS rows, as the blocks are
       multiplied one by one there (group_rows); a group of them beyond */
    int packed_blocks = blocks * per_output;
    int group = M <= SINGLE_ROWS ? per_output : epilogue == 2 ? GATED_GROUP : GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int first = 0; first < packed_blocks; first += group) {
        vec products[GATED_GROUP > GROUP ? GATED_GROUP : GROUP][ROW_CHUNK];
        int nb = packed_blocks - first < group ? packed_blocks - first : group;
        for (int m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            int rows = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            group_rows(x + m0 * x_stride, x_stride, w + (long)first * K * LANES, (long)K * LANES, K, nb, rows,
                       products[0], ROW_CHUNK);
            for (int j = 0; j < nb; j += per_output) {
                int b = (first + j) / per_output; /* the output block */
                int n = N - b * LANES < LANES ? N - b * LANES : LANES;
                const float *block_bias = bias ? bias + (long)(first + j) * LANES : NULL;
                for (int m = 0; m < rows; m++) {
                    float a[LANES], c[LANES];
                    memcpy(a, &products[j][m], sizeof a);
                    if (epilogue == 2) memcpy(c, &products[j + 1][m], sizeof c);
                    float *dst = y + (long)(m0 + m) * y_stride + (long)b * LANES;
                    if (row_scale)
                        for (int l = 0; l < LANES; l++) {
                            a[l] *= row_scale[m0 + m];
                            if (epilogue == 2) c[l] *= row_scale[m0 + m];
                        }
                    if (block_bias)
                        for (int l = 0; l < LANES; l++) {
                            a[l] += block_bias[l];
                            if (epilogue == 2) c[l] += block_bias[LANES + l];
                        }
                    if (epilogue == 0) {
                        for (int l = 0; l < n; l++) dst[l] = a[l];
                    } else if (epilogue == 1) {
                        for (int l = 0; l < n; l++) dst[l] += a[l];
                    } else {
                        /* silu(g) = g / (1 + e^-g); e^-g capped, as the library is built with -ffast-math (no inf) */
#pragma omp simd
                        for (int l = 0; l < LANES; l++) a[l] = a[l] / (1.0f + expf(fminf(-a[l], 80.0f))) * c[l];
                        for (int l = 0; l < n; l++) dst[l] = a[l];
                    }
                }
            }
        }
    }
    free(row_scale);
    return 0;
}

/* Packs `rows` outputs of a (rows, K) weight (rows `w_stride` floats apart), its columns multiplied by scale (K) if
   given, into blocks of LANES outputs `block_stride` floats apart from dst: dst[b][k][j] = w[b LANES + j][k]
   scale[k], zero past the last row. One pass over the weight, which a round repacks as training changes it. */
void grpo_decode_linear_pack(const float *w, long w_stride, int rows, int K, const float *scale, float *dst,
                             long block_stride, int threads) {
    int blocks = (rows + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        float *block = dst + (long)b * block_stride;
        int n = rows - b * LANES < LANES ? rows - b * LANES : LANES;
        for (int k = 0; k < K; k++) {
            float s = scale ? scale[k] : 1.0f;
            for (int j = 0; j < n; j++) block[(long)k * LANES + j] = w[(long)(b * LANES + j) * w_stride + k] * s;
            for (int j = n; j < LANES; j++) block[(long)k * LANES + j] = 0.0f;
        }
    }
}
