/* One token per row from softmax(logits): the decode step's sampler on CPU, in one pass over each row's logits
   after its max.

   A row's token is the first v with  sum_{w <= v} p_w > u,  p = exp(l - max l) (unnormalised), u uniform on
   [0, sum p): an inverse of the CDF with one uniform draw per row. Each p is a float32 exp, as in torch's softmax;
   the sums are taken in double over blocks of BLOCK logits, so summing adds no error beyond double rounding
   (torch's float32 cumsum over 49152 entries drifts by up to 3e-4 in total variation). The block sums are then
   scanned for u's block, and only that block is summed again element by element.

   Logits of -inf (filtered or suppressed tokens) and any more than 120 below the row's max get exactly zero
   probability (exp of at most -120 is 0 in float32), and a token of zero probability is never returned: where
   rounding leaves u past a block's last element, the block's last token of positive probability is. Built with
   -ffast-math, so no comparison here relies on infinities or NaN: a row whose max or sum is not finite (a NaN
   logit, all -inf) is checked by its bits and gets token -1, and sampling.py samples such a batch with torch.

   With `stats`, the same pass also gives the drawn token's log-probability and the row's entropy of
   softmax(logits): with x = l - max, S = sum exp(x) and W = sum exp(x) x (both in double),
   log p(token) = x_token - log S and H = log S - W / S. A token of zero probability adds 0 to S and W (its x is
   clamped at FLOOR, where exp is exactly 0).

   Built and loaded by cpu_kernels.py; called by sampling.py, which documents the contract. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
#define FLOOR -120.0f /* exp(FLOOR) underflows to exactly 0 in float32 */

static inline int finite_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static inline int finite_positive_double(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits >> 63) == 0 && (bits & 0x7ff0000000000000ull) != 0x7ff0000000000000ull && x > 0.0;
}

static inline float clamped(float logit, float max) {
    float x = logit - max;
    return x > FLOOR ? x : FLOOR;
}

static inline float shifted_exp(float logit, float max) { return expf(clamped(logit, max)); }

static double block_sum(const float *logits, int start, int end, float max) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int i = start; i < end; i++) sum += (double)shifted_exp(logits[i], max);
    return sum;
}

/* block_sum, adding sum p x to *weighted (the entropy's second term) */
static double block_sum_weighted(const float *logits, int start, int end, float max, double *weighted) {
    double sum = 0.0, times_x = 0.0;
#pragma omp simd reduction(+ : sum, times_x)
    for (int i = start; i < end; i++) {
        float x = clamped(logits[i], max);
        float p = expf(x);
        sum += (double)p;
        times_x += (double)p * (double)x;
    }
    *weighted += times_x;
    return sum;
}

/* The row's max, or NaN where a logit is NaN: found from the bits, since -ffast-math lets max() skip NaN. */
static float row_max(const float *logits, int vocab) {
    float max = logits[0];
    int nan = 0;
#pragma omp simd reduction(max : max) reduction(| : nan)
    for (int i = 0; i < vocab; i++) {
        uint32_t bits;
        memcpy(&bits, logits + i, sizeof bits);
        nan |= (bits & 0x7fffffffu) > 0x7f800000u;
        max = logits[i] > max ? logits[i] : max;
    }
    return nan ? NAN : max;
}

/* The row's token from `uniform`; with `stats` (not NULL), stats[0] = its log-probability, stats[1] = the
   row's entropy. */
static long sample_row(const float *logits, int vocab, double uniform, double *sums, double *stats) {
    float max = row_max(logits, vocab);
    if (!finite_float(max)) return -1;
    int blocks = (vocab + BLOCK - 1) / BLOCK;
    double total = 0.0, weighted = 0.0;
    for (int b = 0; b < blocks; b++) {
        int end = (b + 1) * BLOCK < vocab ? (b + 1) * BLOCK : vocab;
        sums[b] = stats ? block_sum_weighted(logits, b * BLOCK, end, max, &weighted)
                        : block_sum(logits, b * BLOCK, end, max);
        total += sums[b];
    }
    if (!finite_positive_double(total)) return -1;
    double target = uniform * total, before = 0.0;
    int chosen = -1; /* u's block; the last block of positive mass where rounding runs past the end */
    for (int b = 0; b < blocks; b++) {
        if (sums[b] > 0.0) chosen = b;
        if (sums[b] > 0.0 && before + sums[b] > target) break;
        before += sums[b];
    }
    int start = chosen * BLOCK, end = start + BLOCK < vocab ? start + BLOCK : vocab;
    long token = start;
    double running = before;
    for (int i = start; i < end; i++) {
        float p = shifted_exp(logits[i], max);
        if (p > 0.0f) {
            token = i;
            running += (double)p;
            if (running > target) break;
        }
    }
    if (stats) {
        stats[0] = (double)clamped(logits[token], max) - log(total);
        stats[1] = log(total) - weighted / total;
    }
    return token;
}

/* tokens[r] for each of `rows` rows of `logits` (row r at logits + r * row_stride, `vocab` entries), from
   `uniforms[r]` in [0, 1); -1 where the row's max or sum is not finite. `stats` (rows x 2, NULL: not wanted)
   gets each row's drawn token's log-probability and its entropy of softmax(logits), in nats. */
void grpo_sample_tokens(const float *logits, long row_stride, const double *uniforms, int rows, int vocab,
                        long *tokens, double *stats, int threads) {
    int blocks = (vocab + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads)
    {
        double sums[blocks]; /* 6 KB for a 49k vocabulary, 32 KB for 256k */
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            tokens[r] = sample_row(logits + r * row_stride, vocab, uniforms[r], sums, stats ? stats + 2 * r : NULL);
    }
}
