/* An XLA:CPU custom call that runs float32 matrix products (one, or a strided batch) through the BLAS
 * sgemm (MKL or OpenBLAS: cpu_gemm.py picks it).
 *
 * In C so that a call never takes Python's lock: XLA may run it on any of its threads, at the same time
 * as other ops. The work goes out in fixed pieces (whole matrices of a batch, or rows of a single
 * product) over the pool (pool.h). With lima_whole_single a single product is one piece and the BLAS
 * threads it itself (MKL's threads split it better than rows: measured on an AVX-512 Xeon). The pieces
 * never depend on timing, so results do not either.
 *
 * The opaque string is "ta,tb,m,n,k,lda,stride_a,ldb,stride_b,ldc,stride_c,batch,beta" (row-major
 * operands, strides in elements), written by cpu_gemm.py. */
#include <stddef.h>

#include "pool.h"

typedef struct {
  int ta, tb, m, n, k, lda, ldb, ldc, batch, pieces;
  long stride_a, stride_b, stride_c;
  float beta;
  const float *a, *b;
  float *c;
} job_t;

static void product(const job_t *j, int rows, const float *a, const float *b, float *c) {
  lima_rm_gemm(j->ta, j->tb, rows, j->n, j->k, 1.f, a, j->lda, b, j->ldb, j->beta, c, j->ldc);
}

static void run_piece(const void *ctx, int i, int thread) {
  const job_t *j = ctx;
  (void)thread;
  if (j->batch > 1) {
    long lo = (long)j->batch * i / j->pieces, hi = (long)j->batch * (i + 1) / j->pieces;
    for (long t = lo; t < hi; t++)
      product(j, j->m, j->a + t * j->stride_a, j->b + t * j->stride_b, j->c + t * j->stride_c);
  } else { /* rows of op(a): columns of a when transposed */
    long lo = (long)j->m * i / j->pieces, hi = (long)j->m * (i + 1) / j->pieces;
    product(j, (int)(hi - lo), j->a + (j->ta ? lo : lo * j->lda), j->b, j->c + lo * j->ldc);
  }
}

void lima_sgemm_call(void *out, const void **in, const char *opaque, size_t opaque_len, void *status) {
  (void)status;
  long v[13];
  if (lima_parse_config(opaque, opaque_len, v, 13)) return;
  job_t j = {.ta = (int)v[0], .tb = (int)v[1], .m = (int)v[2], .n = (int)v[3], .k = (int)v[4],
             .lda = (int)v[5], .stride_a = v[6], .ldb = (int)v[7], .stride_b = v[8], .ldc = (int)v[9],
             .stride_c = v[10], .batch = (int)v[11], .beta = (float)v[12],
             .a = in[0], .b = in[1], .c = out};
  if (!(j.m && j.n && j.batch)) return; /* an empty result: nothing to write (buffers may be null) */
  int whole = lima_whole_single && j.batch == 1;
  j.pieces = whole ? 1 : j.batch > 1 ? lima_min(j.batch, 4L * lima_threads) : lima_min(j.m, lima_threads);
  lima_use_blas_threads(whole ? lima_threads : 1);
  pthread_mutex_lock(&lima_one_call);
  lima_run_pieces(j.pieces, run_piece, &j);
  pthread_mutex_unlock(&lima_one_call);
}
