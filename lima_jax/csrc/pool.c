/* The shared part of the CPU custom calls (pool.h): the BLAS pointers, set once by cpu_gemm.py through
 * lima_cpu_init, and the thread pool. Also the extension module's entry point: pip builds and installs
 * lima_jax._cpu_calls like any extension; it has no Python functions (cpu_gemm.py loads it with ctypes
 * and hands the calls' addresses to XLA). */
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

sgemm_fn lima_gemm;
int lima_threads = 1, lima_whole_single;
pthread_mutex_t lima_one_call = PTHREAD_MUTEX_INITIALIZER;

static set_threads_fn set_local_threads; /* NULL: the BLAS is single-threaded already */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* guards the job below */
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static piece_fn job_piece;
static const void *job_ctx;
static int job_pieces, next_piece, done_pieces;

void lima_use_blas_threads(int n) {
  if (set_local_threads) set_local_threads(&n);
}

/* Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: the same buffers, operands swapped. */
void lima_rm_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                  int ldb, float beta, float *c, int ldc) {
  lima_gemm(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

static void *helper(void *arg) {
  int thread = (int)(long)arg;
  lima_use_blas_threads(1);
  pthread_mutex_lock(&mu);
  for (;;) {
    while (next_piece >= job_pieces) pthread_cond_wait(&work_cv, &mu);
    int i = next_piece++, pieces = job_pieces;
    piece_fn piece = job_piece;
    const void *ctx = job_ctx;
    pthread_mutex_unlock(&mu);
    piece(ctx, i, thread);
    pthread_mutex_lock(&mu);
    if (++done_pieces == pieces) pthread_cond_signal(&done_cv);
  }
  return NULL;
}

void lima_run_pieces(int pieces, piece_fn piece, const void *ctx) {
  pthread_mutex_lock(&mu);
  job_piece = piece;
  job_ctx = ctx;
  job_pieces = pieces;
  next_piece = 0;
  done_pieces = 0;
  if (pieces > 1) pthread_cond_broadcast(&work_cv);
  while (next_piece < pieces) {
    int i = next_piece++;
    pthread_mutex_unlock(&mu);
    piece(ctx, i, 0);
    pthread_mutex_lock(&mu);
    done_pieces++;
  }
  while (done_pieces < pieces) pthread_cond_wait(&done_cv, &mu);
  pthread_mutex_unlock(&mu);
}

int lima_parse_config(const char *opaque, size_t opaque_len, long *values, int count) {
  char text[512]; /* enough for 24 integers */
  if (opaque_len >= sizeof text) return -1;
  memcpy(text, opaque, opaque_len);
  text[opaque_len] = 0;
  char *p = text;
  for (int i = 0; i < count; i++) values[i] = strtol(p, &p, 10), p += (*p == ',');
  return 0;
}

/* Called once, before the first call: the sgemm, MKL's per-thread thread count setter (or NULL), the
 * threads to use, and whether a single product goes to the BLAS whole. Returns 0, or -1 if a helper
 * thread could not start. */
int lima_cpu_init(void *sgemm, void *set_threads, int thread_count, int whole_single) {
  lima_gemm = (sgemm_fn)sgemm;
  set_local_threads = (set_threads_fn)set_threads;
  lima_threads = thread_count > 0 ? thread_count : 1;
  lima_whole_single = whole_single;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  for (int t = 1; t < lima_threads; t++) {
    pthread_t th;
    if (pthread_create(&th, &attr, helper, (void *)(long)t)) return -1;
  }
  pthread_attr_destroy(&attr);
  return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_cpu_calls", .m_size = -1};

PyMODINIT_FUNC PyInit__cpu_calls(void) { return PyModule_Create(&module); }
