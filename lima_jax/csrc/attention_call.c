/* XLA:CPU custom calls for causal attention in float32, forward and backward, fused: each (batch, head)
 * and block of query rows is one piece of work (pool.h) that multiplies its scores through the BLAS
 * (sequential, one per thread) into a scratch buffer, turns them into probabilities there, while they
 * are in cache, and multiplies on. XLA's version of the same algorithm (attention.py) wrote and read
 * every block's scores, probabilities and their gradients through memory in a dozen ops per layer.
 *
 * q, out, dq are [B, T, H, D]; k, v, dk, dv [B, T, KVH, D]: read and written where they lie (rows of
 * one head are H·D floats apart), so no transposes. Query head h uses kv head h / (H / KVH). mask is
 * [B, T, T] bool (1 byte each), true where a query may see a key; it must be causal (query block
 * [s, e) only looks at keys [0, e)). lse [B, H, T] keeps each row's log-normaliser for the backward
 * pass (FlashAttention's): the probabilities are recomputed from q, k rather than stored. A row that
 * sees no key (left padding) gets zero output and gradient; it is padding, which no other position
 * reads.
 *
 * Work: the forward splits over (batch, head, query block); the backward over (batch, kv head), each
 * piece owning its rows of dk, dv, so sums are never shared between threads and results never depend on
 * timing. The scratch buffers come from XLA (an extra output), [threads, 2, block, T] floats.
 *
 * The opaque string is "B,T,H,KVH,D,block,threads", written by attention.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"

/* The row loops are compiled for AVX-512 and AVX2 too, picked at load time by the CPU's features. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* The row loops go in LANES independent lanes so that they vectorize, in the same order on any ISA. */
#define LANES 16

/* e^x for x <= 0, 0 below -87.3 (and for -inf): e^x = 2^n e^r with n = round(x log2 e) and
 * r = x - n ln 2 (ln 2 in two parts, so r keeps its precision); e^r by its Taylor polynomial of degree 7
 * (relative error below 1e-8 for |r| <= ln2 / 2). Plain arithmetic, so it vectorizes. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  float c = x > -87.5f ? x : -87.5f; /* also maps NaN and -inf to a finite value; the select below zeroes */
  float n = (c * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest, no library call */
  float r = (c - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f + r * (1.f / 40320.f);
  p = 1.f / 720.f + r * p;
  p = 1.f / 120.f + r * p;
  p = 1.f / 24.f + r * p;
  p = 1.f / 6.f + r * p;
  p = 0.5f + r * p;
  p = 1.f + r * p;
  p = 1.f + r * p;
  uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* 2^n */
  float two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.3f ? 0.f : p * two_n;
}

/* Scores s[0:n] (q·k, unscaled) → probabilities, in place; returns the row's log-normaliser, or
 * INFINITY (and zeros) for a row that sees no key. */
VECTOR_CLONES static float softmax_row(float *s, const unsigned char *mask, int n, float scale) {
  float lane_max[LANES], lane_sum[LANES];
  for (int l = 0; l < LANES; l++) lane_max[l] = -INFINITY, lane_sum[l] = 0.f;
  int full = n - n % LANES;
  for (int j = 0; j < n; j++) s[j] = mask[j] ? s[j] * scale : -INFINITY;
  for (int j = 0; j < full; j += LANES)
    for (int l = 0; l < LANES; l++) lane_max[l] = s[j + l] > lane_max[l] ? s[j + l] : lane_max[l];
  for (int j = full; j < n; j++) lane_max[0] = s[j] > lane_max[0] ? s[j] : lane_max[0];
  float max = -INFINITY;
  for (int l = 0; l < LANES; l++) max = lane_max[l] > max ? lane_max[l] : max;
  if (max == -INFINITY) {
    memset(s, 0, sizeof(float) * n);
    return INFINITY;
  }
  for (int j = 0; j < n; j++) s[j] = exp_nonpositive(s[j] - max);
  for (int j = 0; j < full; j += LANES)
    for (int l = 0; l < LANES; l++) lane_sum[l] += s[j + l];
  for (int j = full; j < n; j++) lane_sum[0] += s[j];
  float sum = 0.f;
  for (int l = 0; l < LANES; l++) sum += lane_sum[l];
  float inverse = 1.f / sum;
  for (int j = 0; j < n; j++) s[j] *= inverse;
  return max + logf(sum);
}

/* From scores s (q·k, unscaled) and dp = d_out·v: p = e^(scale s - lse) where the mask allows, else 0,
 * into s; the scores' gradient p (dp - delta) scale into dp. delta = d_out·out, the softmax gradient's
 * row term. */
VECTOR_CLONES static void softmax_grad_row(float *s, float *dp, const unsigned char *mask, int n, float scale,
                                           float lse, float delta) {
  for (int j = 0; j < n; j++) {
    float p = exp_nonpositive(mask[j] ? s[j] * scale - lse : -INFINITY);
    s[j] = p;
    dp[j] = p * (dp[j] - delta) * scale;
  }
}

VECTOR_CLONES static float dot(const float *a, const float *b, int n) {
  float lane[LANES] = {0};
  int full = n - n % LANES;
  for (int i = 0; i < full; i += LANES)
    for (int l = 0; l < LANES; l++) lane[l] += a[i + l] * b[i + l];
  for (int i = full; i < n; i++) lane[0] += a[i] * b[i];
  float sum = 0.f;
  for (int l = 0; l < LANES; l++) sum += lane[l];
  return sum;
}

typedef struct {
  int b, t, h, kvh, d, block, blocks, slots;
  float scale;
  const float *q, *k, *v, *out_in, *lse_in, *d_out;
  const unsigned char *mask;
  float *out, *lse, *dq, *dk, *dv, *scratch;
} attention_t;

/* Query block `blk`'s rows [*start, end); returns end. */
static int block_rows(const attention_t *a, int blk, int *start) {
  *start = blk * a->block;
  return lima_min(*start + a->block, a->t);
}

static float *scratch(const attention_t *a, int thread) {
  return a->scratch + (long)thread * 2 * a->block * a->t;
}

static void forward_piece(const void *ctx, int piece, int thread) {
  const attention_t *a = ctx;
  int blk = a->blocks - 1 - piece % a->blocks; /* the longest blocks first: the last pieces are short */
  int hi = piece / a->blocks % a->h, bi = piece / a->blocks / a->h, kh = hi / (a->h / a->kvh);
  int start, end = block_rows(a, blk, &start), rows = end - start;
  int q_ld = a->h * a->d, kv_ld = a->kvh * a->d;
  long q_at = ((long)bi * a->t + start) * q_ld + (long)hi * a->d, kv_at = (long)bi * a->t * kv_ld + (long)kh * a->d;
  float *s = scratch(a, thread);
  lima_rm_gemm(0, 1, rows, end, a->d, 1.f, a->q + q_at, q_ld, a->k + kv_at, kv_ld, 0.f, s, end);
  for (int r = 0; r < rows; r++) {
    const unsigned char *mask = a->mask + ((long)bi * a->t + start + r) * a->t;
    a->lse[((long)bi * a->h + hi) * a->t + start + r] = softmax_row(s + (long)r * end, mask, end, a->scale);
  }
  lima_rm_gemm(0, 0, rows, a->d, end, 1.f, s, end, a->v + kv_at, kv_ld, 0.f, a->out + q_at, q_ld);
}

static void backward_piece(const void *ctx, int piece, int thread) {
  const attention_t *a = ctx;
  int bi = piece / a->kvh, kh = piece % a->kvh, groups = a->h / a->kvh;
  int q_ld = a->h * a->d, kv_ld = a->kvh * a->d;
  long kv_at = (long)bi * a->t * kv_ld + (long)kh * a->d;
  const float *k = a->k + kv_at, *v = a->v + kv_at;
  float *dk = a->dk + kv_at, *dv = a->dv + kv_at, *s = scratch(a, thread), *dp = s + (long)a->block * a->t;
  for (int i = 0; i < a->t; i++) {
    memset(dk + (long)i * kv_ld, 0, sizeof(float) * a->d);
    memset(dv + (long)i * kv_ld, 0, sizeof(float) * a->d);
  }
  for (int hi = kh * groups; hi < (kh + 1) * groups; hi++)
    for (int blk = 0; blk < a->blocks; blk++) {
      int start, end = block_rows(a, blk, &start), rows = end - start;
      long q_at = ((long)bi * a->t + start) * q_ld + (long)hi * a->d;
      const float *q = a->q + q_at, *out = a->out_in + q_at, *d_out = a->d_out + q_at;
      lima_rm_gemm(0, 1, rows, end, a->d, 1.f, q, q_ld, k, kv_ld, 0.f, s, end);
      lima_rm_gemm(0, 1, rows, end, a->d, 1.f, d_out, q_ld, v, kv_ld, 0.f, dp, end);
      for (int r = 0; r < rows; r++) {
        const unsigned char *mask = a->mask + ((long)bi * a->t + start + r) * a->t;
        float lse = a->lse_in[((long)bi * a->h + hi) * a->t + start + r];
        float delta = dot(d_out + (long)r * q_ld, out + (long)r * q_ld, a->d);
        softmax_grad_row(s + (long)r * end, dp + (long)r * end, mask, end, a->scale, lse, delta);
      }
      lima_rm_gemm(1, 0, end, a->d, rows, 1.f, s, end, d_out, q_ld, 1.f, dv, kv_ld);        /* dv += pᵀ d_out */
      lima_rm_gemm(0, 0, rows, a->d, end, 1.f, dp, end, k, kv_ld, 0.f, a->dq + q_at, q_ld); /* dq = ds k */
      lima_rm_gemm(1, 0, end, a->d, rows, 1.f, dp, end, q, q_ld, 1.f, dk, kv_ld);           /* dk += dsᵀ q */
    }
}

/* Reads the opaque config; returns 0 if there is work to do with the scratch XLA gave. */
static int configure(attention_t *a, const char *opaque, size_t opaque_len) {
  long v[7];
  memset(a, 0, sizeof *a);
  if (lima_parse_config(opaque, opaque_len, v, 7)) return -1;
  a->b = (int)v[0], a->t = (int)v[1], a->h = (int)v[2], a->kvh = (int)v[3], a->d = (int)v[4];
  a->block = lima_min((int)v[5], a->t), a->slots = (int)v[6];
  if (a->b < 1 || a->t < 1 || a->block < 1 || a->kvh < 1 || a->slots < lima_threads) return -1;
  a->blocks = (a->t + a->block - 1) / a->block;
  a->scale = 1.f / sqrtf((float)a->d);
  return 0;
}

/* in: q, k, v, mask; out: (out, lse, scratch). */
void lima_attention_forward(void *out, const void **in, const char *opaque, size_t opaque_len, void *status) {
  (void)status;
  attention_t a;
  if (configure(&a, opaque, opaque_len)) return;
  void **outs = out;
  a.q = in[0], a.k = in[1], a.v = in[2], a.mask = in[3];
  a.out = outs[0], a.lse = outs[1], a.scratch = outs[2];
  lima_use_blas_threads(1);
  pthread_mutex_lock(&lima_one_call);
  lima_run_pieces(a.b * a.h * a.blocks, forward_piece, &a);
  pthread_mutex_unlock(&lima_one_call);
}

/* in: q, k, v, mask, out, lse, d_out; out: (dq, dk, dv, scratch). */
void lima_attention_backward(void *out, const void **in, const char *opaque, size_t opaque_len, void *status) {
  (void)status;
  attention_t a;
  if (configure(&a, opaque, opaque_len)) return;
  void **outs = out;
  a.q = in[0], a.k = in[1], a.v = in[2], a.mask = in[3], a.out_in = in[4], a.lse_in = in[5], a.d_out = in[6];
  a.dq = outs[0], a.dk = outs[1], a.dv = outs[2], a.scratch = outs[3];
  lima_use_blas_threads(1);
  pthread_mutex_lock(&lima_one_call);
  lima_run_pieces(a.b * a.kvh, backward_piece, &a);
  pthread_mutex_unlock(&lima_one_call);
}
