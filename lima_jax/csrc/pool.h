/* What the CPU custom calls share: the BLAS's sgemm, chosen at run time, and a small pool of threads
 * that sleep between calls. */
#ifndef LIMA_JAX_POOL_H
#define LIMA_JAX_POOL_H

#include <pthread.h>

/* Fortran sgemm (column-major, arguments by reference) and MKL's per-thread thread count. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
typedef void (*set_threads_fn)(const int *);

extern sgemm_fn lima_gemm;
extern int lima_threads;      /* the calling thread and lima_threads - 1 helpers */
extern int lima_whole_single; /* a single product goes to the BLAS whole, with its own threads */
/* Held for a whole call: two calls at once would oversubscribe the cores. */
extern pthread_mutex_t lima_one_call;

/* Row-major C = alpha op(A) op(B) + beta C, m x n, through the column-major sgemm. */
void lima_rm_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                  int ldb, float beta, float *c, int ldc);

/* How many threads the BLAS itself may use on the calling thread (MKL; a no-op for OpenBLAS). */
void lima_use_blas_threads(int n);

/* Runs piece(ctx, i, thread) for each i in [0, pieces) over the calling thread (thread 0) and the
 * helpers (1 ...): each takes the next piece when done with one, so a helper the OS wakes late leaves
 * its share to the others. Call it holding lima_one_call. */
typedef void (*piece_fn)(const void *ctx, int piece, int thread);
void lima_run_pieces(int pieces, piece_fn piece, const void *ctx);

static inline int lima_min(long a, long b) { return (int)(a < b ? a : b); }

/* The opaque config of a call: `count` comma-separated integers. Returns 0, or -1 if it is too long. */
int lima_parse_config(const char *opaque, size_t opaque_len, long *values, int count);

#endif
