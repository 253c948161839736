/* An XLA:CPU custom call that runs float32 matrix products (one, or a strided batch) through a BLAS
 * sgemm chosen at run time (MKL or OpenBLAS: cpu_gemm.py picks it and passes its address in).
 *
 * Written in C so that a call never takes Python's lock: XLA may run it on any of its threads, at the
 * same time as other ops. The work goes out in fixed pieces (whole matrices of a batch, or rows of a
 * single product) to the calling thread and helper threads of ours, which sleep between calls; each
 * thread takes the next piece when done with one, so a helper the OS wakes late leaves its share to
 * the others. With `whole_single` a single product is one piece and the BLAS threads it itself (MKL's
 * threads split it better than rows: measured on an AVX-512 Xeon). The pieces never depend on timing,
 * so results do not either. One call at a time: two at once would oversubscribe the cores.
 *
 * The opaque string is "ta,tb,m,n,k,lda,stride_a,ldb,stride_b,ldc,stride_c,batch,beta" (row-major
 * operands, strides in elements), written by cpu_gemm.py.
 *
 * Built as the extension module lima_jax._sgemm_call (it defines no Python functions; cpu_gemm.py
 * calls lima_sgemm_init and hands lima_sgemm_call to XLA through ctypes). */
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Fortran sgemm (column-major, arguments by reference) and MKL's per-thread thread count. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
typedef void (*set_threads_fn)(const int *);

typedef struct {
  int ta, tb, m, n, k, lda, ldb, ldc, batch, pieces;
  long stride_a, stride_b, stride_c;
  float beta;
  const float *a, *b;
  float *c;
} job_t;

static sgemm_fn gemm;
static set_threads_fn set_local_threads; /* NULL: the BLAS is single-threaded already */
static int threads = 1, whole_single;

static pthread_mutex_t one_call = PTHREAD_MUTEX_INITIALIZER; /* held for a whole call */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;       /* guards the fields below */
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static job_t job;
static int next_piece, done_pieces;

static void use_blas_threads(int n) {
  if (set_local_threads) set_local_threads(&n);
}

/* Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: the same buffers, operands swapped. */
static void product(const job_t *j, int rows, const float *a, const float *b, float *c) {
  const float one = 1.0f;
  gemm(j->tb ? "T" : "N", j->ta ? "T" : "N", &j->n, &rows, &j->k, &one, b, &j->ldb, a, &j->lda, &j->beta, c,
       &j->ldc);
}

static void run_piece(const job_t *j, int i) {
  if (j->batch > 1) {
    long lo = (long)j->batch * i / j->pieces, hi = (long)j->batch * (i + 1) / j->pieces;
    for (long t = lo; t < hi; t++)
      product(j, j->m, j->a + t * j->stride_a, j->b + t * j->stride_b, j->c + t * j->stride_c);
  } else { /* rows of op(a): columns of a when transposed */
    long lo = (long)j->m * i / j->pieces, hi = (long)j->m * (i + 1) / j->pieces;
    product(j, (int)(hi - lo), j->a + (j->ta ? lo : lo * j->lda), j->b, j->c + lo * j->ldc);
  }
}

static void *helper(void *unused) {
  (void)unused;
  use_blas_threads(1);
  pthread_mutex_lock(&mu);
  for (;;) {
    while (next_piece >= job.pieces) pthread_cond_wait(&work_cv, &mu);
    int i = next_piece++;
    job_t j = job;
    pthread_mutex_unlock(&mu);
    run_piece(&j, i);
    pthread_mutex_lock(&mu);
    if (++done_pieces == j.pieces) pthread_cond_signal(&done_cv);
  }
  return NULL;
}

/* Called once, before the first call: the sgemm, MKL's per-thread thread count setter (or NULL), the
 * threads to use, and whether a single product goes to the BLAS whole. Returns 0, or -1 if a helper
 * thread could not start. */
int lima_sgemm_init(void *sgemm, void *set_threads, int thread_count, int whole) {
  gemm = (sgemm_fn)sgemm;
  set_local_threads = (set_threads_fn)set_threads;
  threads = thread_count > 0 ? thread_count : 1;
  whole_single = whole;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  for (int t = 1; t < threads; t++) {
    pthread_t th;
    if (pthread_create(&th, &attr, helper, NULL)) return -1;
  }
  pthread_attr_destroy(&attr);
  return 0;
}

static int min_int(long a, long b) { return (int)(a < b ? a : b); }

void lima_sgemm_call(void *out, const void **in, const char *opaque, size_t opaque_len, void *status) {
  (void)status;
  char text[512]; /* 13 integers: at most ~270 characters */
  long v[13];
  if (opaque_len >= sizeof text) return;
  memcpy(text, opaque, opaque_len);
  text[opaque_len] = 0;
  char *p = text;
  for (int i = 0; i < 13; i++) v[i] = strtol(p, &p, 10), p += (*p == ',');
  job_t j = {.ta = (int)v[0], .tb = (int)v[1], .m = (int)v[2], .n = (int)v[3], .k = (int)v[4],
             .lda = (int)v[5], .stride_a = v[6], .ldb = (int)v[7], .stride_b = v[8], .ldc = (int)v[9],
             .stride_c = v[10], .batch = (int)v[11], .beta = (float)v[12],
             .a = in[0], .b = in[1], .c = out};
  if (!(j.m && j.n && j.batch)) return; /* an empty result: nothing to write (buffers may be null) */
  int whole = whole_single && j.batch == 1;
  j.pieces = whole ? 1 : j.batch > 1 ? min_int(j.batch, 4L * threads) : min_int(j.m, threads);
  use_blas_threads(whole ? threads : 1);

  pthread_mutex_lock(&one_call);
  pthread_mutex_lock(&mu);
  job = j;
  next_piece = 0;
  done_pieces = 0;
  if (j.pieces > 1) pthread_cond_broadcast(&work_cv);
  while (next_piece < j.pieces) {
    int i = next_piece++;
    pthread_mutex_unlock(&mu);
    run_piece(&j, i);
    pthread_mutex_lock(&mu);
    done_pieces++;
  }
  while (done_pieces < j.pieces) pthread_cond_wait(&done_cv, &mu);
  pthread_mutex_unlock(&mu);
  pthread_mutex_unlock(&one_call);
}

/* An importable module, so that pip builds and installs it like any extension; it has no functions. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_sgemm_call", .m_size = -1};

PyMODINIT_FUNC PyInit__sgemm_call(void) { return PyModule_Create(&module); }
