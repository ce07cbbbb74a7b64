/* The linear layers of a CPU decode step: y = x W^T (+ b) for the few rows of a step (M <= ~32) and a weight
   streamed from memory, since a model's weights do not fit in the CPU's caches.

   At a step's few rows a linear is neither purely compute- nor memory-bound: it streams each weight once, doing
   M multiply-adds per weight. oneDNN's and BLAS's kernels stall on that stream (measured on a 2-core CPU: about
   14 GB/s of a 33 GB/s memory, 100-140 of a 190 GFLOP/s peak). Here W is packed in blocks of LANES outputs,
   (N / LANES, K, LANES): a block is one sequential stream, fetched ahead with software prefetch, and each of its
   64-byte lines meets up to 16 rows' broadcast inputs in registers (a 16 x LANES tile of accumulators).

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
#define MAX_TILE 16
#else
#define LANES 8
#define MAX_TILE 8 /* 16 accumulators of 8 floats fill AVX2's 16 registers: 8 rows at a time */
#endif
#define PREFETCH_LINES 96 /* about 6 KB ahead of the line being multiplied: memory latency at the tile's pace */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[m] = sum_k x[m, k] w[k, :], for `R` rows (a compile-time constant, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void tile(const float *restrict x, long x_stride,
                                                       const float *restrict w, int K, vec *restrict out, int R) {
    vec acc[MAX_TILE];
    for (int m = 0; m < R; m++) acc[m] = (vec){0};
    for (int k = 0; k < K; k++) {
        __builtin_prefetch(w + (long)(k + PREFETCH_LINES) * LANES, 0, 1);
        vec wk = load(w + (long)k * LANES);
        for (int m = 0; m < R; m++) acc[m] += x[m * x_stride + k] * wk;
    }
    for (int m = 0; m < R; m++) out[m] = acc[m];
}

#define TILE_OF(R)                                                                                            \
    static void tile_##R(const float *x, long x_stride, const float *w, int K, vec *out) {                    \
        tile(x, x_stride, w, K, out, R);                                                                      \
    }
TILE_OF(1) TILE_OF(2) TILE_OF(3) TILE_OF(4) TILE_OF(5) TILE_OF(6) TILE_OF(7) TILE_OF(8)
#if MAX_TILE >= 16
TILE_OF(9) TILE_OF(10) TILE_OF(11) TILE_OF(12) TILE_OF(13) TILE_OF(14) TILE_OF(15) TILE_OF(16)
#endif

typedef void (*tile_fn)(const float *, long, const float *, int, vec *);
static const tile_fn tiles[MAX_TILE + 1] = {
    NULL, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6, tile_7, tile_8,
#if MAX_TILE >= 16
    tile_9, tile_10, tile_11, tile_12, tile_13, tile_14, tile_15, tile_16,
#endif
};

/* out[m] for all `rows` rows of one weight block, MAX_TILE rows a pass and the rest in one more: a step whose
   rows are not a power of two (rows leave as their completions end) passes over the block no more often than
   needed (SmolLM2's layers at 14 rows, a scratch C benchmark: 23.8 ms a step in passes of 8, 4 and 2 rows, 20.2
   ms in one; 15 rows 27.3 -> 20.7 ms). The block is read from cache after the first pass. */
static void block_rows(const float *x, long x_stride, const float *w, int K, int rows, vec *out) {
    for (int m = 0; m < rows; m += MAX_TILE) {
        int r = rows - m < MAX_TILE ? rows - m : MAX_TILE;
        tiles[r](x + m * x_stride, x_stride, w, K, out + m);
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
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        vec first[ROW_CHUNK], second[ROW_CHUNK];
        int n = N - b * LANES < LANES ? N - b * LANES : LANES;
        const float *block = w + (long)b * per_output * K * LANES;
        const float *block_bias = bias ? bias + (long)b * per_output * LANES : NULL;
        for (int m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            int rows = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            block_rows(x + m0 * x_stride, x_stride, block, K, rows, first);
            if (epilogue == 2) block_rows(x + m0 * x_stride, x_stride, block + (long)K * LANES, K, rows, second);
            for (int m = 0; m < rows; m++) {
                float a[LANES], c[LANES];
                memcpy(a, &first[m], sizeof a);
                if (epilogue == 2) memcpy(c, &second[m], sizeof c);
                float *dst = y + (long)(m0 + m) * y_stride + (long)b * LANES;
                if (row_scale)
                    for (int j = 0; j < LANES; j++) {
                        a[j] *= row_scale[m0 + m];
                        if (epilogue == 2) c[j] *= row_scale[m0 + m];
                    }
                if (block_bias)
                    for (int j = 0; j < LANES; j++) {
                        a[j] += block_bias[j];
                        if (epilogue == 2) c[j] += block_bias[LANES + j];
                    }
                if (epilogue == 0) {
                    for (int j = 0; j < n; j++) dst[j] = a[j];
                } else if (epilogue == 1) {
                    for (int j = 0; j < n; j++) dst[j] += a[j];
                } else {
                    /* silu(g) = g / (1 + e^-g); e^-g capped, as the library is built with -ffast-math (no inf) */
#pragma omp simd
                    for (int j = 0; j < LANES; j++) a[j] = a[j] / (1.0f + expf(fminf(-a[j], 80.0f))) * c[j];
                    for (int j = 0; j < n; j++) dst[j] = a[j];
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
