"""Batched float32 matrix products through OpenBLAS, as XLA custom calls, for one-device CPU programs.

Training attention multiplies many small matrices: per (batch, kv head), a block of 128 query rows
against up to 512 keys of 64 dims. XLA:CPU's Eigen kernels run these batched dots at 35-75 GFLOP/s on
a 2-core EPYC; through OpenBLAS's `sgemm_batch_strided`, a 58M layer's attention forward + backward
took 20-30% less time (measured in one process). The LM head's wide product (2048 × 512 by 512 × 32000
and its two gradients) ran 8-16% faster through OpenBLAS too, and its forward + backward with the loss
~10% faster; the layers' 2-D products gained nothing inside a program (chains of them forward and
backward: within noise), so they stay XLA dots.

`batched_matmul` is the one product attention needs: op(a) @ op(b[:, :b_rows]), optionally added into
the leading rows of an accumulator. As a custom call it reads b's row prefix where it lies and adds
into the accumulator in place (its buffer is the output), so no slice or update is copied. `matmul`
is a differentiable 2-D product on top of it, for the LM head.

How: OpenBLAS comes from the `scipy-openblas32` wheel. A C function pointer made by ctypes is
registered as an XLA CPU custom-call target in the "status returning, unified" convention (out, ins,
opaque, opaque_len, status); the opaque string carries the product's shape, strides and beta. OpenBLAS
runs single-threaded, on the calling XLA thread and helper threads of ours that sleep between calls:
OpenBLAS's own threads spin for ~0.1 s after each call, which slowed XLA's next ops so much that the
whole train step got slower. The split (by matrix, or by rows of a single one) is fixed, so results
are deterministic.

Only for programs that run on one CPU device: a custom call has no sharding rule, so a sharded program
would gather its operands. `enabled(True)` turns it on while a program is traced; otherwise, and for
non-float32 operands, `batched_matmul` is an XLA dot. The flag reaches `batched_matmul` as an
argument (attention reads `is_enabled()` when traced and passes it on as a static argument of its
custom VJP), so JAX's caches of traced functions keep the two apart.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

from lima_jax import cpu_tuning

_TARGET = "lima_jax_sgemm_batch_strided"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_tracing = threading.local()
_registered: list = []  # the library and the ctypes callback, alive as long as XLA may call them
_registering = threading.Lock()
# Batched calls (attention) go out in this many pieces per thread, which the threads take as they
# free up: in lima-train's 58M step these calls took ~6% less time than with one fixed piece per
# thread (696 → 656 and 786 → 738 ms per step, two paired runs).
_PIECES_PER_THREAD = 4


def available() -> bool:
    """Whether the OpenBLAS custom call can be registered here (the wheel is installed and loads)."""
    try:
        _register()
    except (ImportError, OSError, AttributeError):
        return False
    return True


def usable_on(mesh) -> bool:
    """Whether a program over `mesh` should use OpenBLAS: one CPU device, OpenBLAS present."""
    return cpu_tuning.one_cpu_device(mesh) and available()


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Marks the programs traced within this context as one-device CPU programs that may use OpenBLAS
    (`is_enabled()`). A function whose trace JAX has cached keeps that trace: enter the context inside
    the jitted function (as lima-train's step does), not around a call of it."""
    previous = is_enabled()
    _tracing.on = on
    try:
        yield
    finally:
        _tracing.on = previous


def is_enabled() -> bool:
    return getattr(_tracing, "on", False)


def batched_matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
                   b_rows: Optional[int] = None, accumulate: Optional[jax.Array] = None,
                   preferred_element_type=None, blas: bool = False) -> jax.Array:
    """op(a[i]) @ op(b[i, :b_rows]) for each i, with a [batch, ·, ·], b [batch, rows, ·] and op a
    transpose where asked: [batch, m, n]. With `accumulate` [batch, R ≥ m, n], returns it with the
    product added to its first m rows. blas: one OpenBLAS custom call if the operands are float32
    (only for one-device CPU programs, see `usable_on`); otherwise XLA's dot."""
    if blas and a.dtype == b.dtype == jnp.float32 and (
            accumulate is None or accumulate.dtype == jnp.float32):
        return _sgemm_batch(a, b, transpose_a, transpose_b, b.shape[1] if b_rows is None else b_rows, accumulate)
    bp = b if b_rows is None else b[:, :b_rows]
    out = jnp.matmul(a.swapaxes(1, 2) if transpose_a else a, bp.swapaxes(1, 2) if transpose_b else bp,
                     preferred_element_type=preferred_element_type)
    if accumulate is None:
        return out
    return accumulate.at[:, :out.shape[1]].add(out.astype(accumulate.dtype))


def _sgemm_batch(a, b, transpose_a, transpose_b, b_rows, accumulate):
    _register()
    batch, ra, ca = a.shape
    _, rb, cb = b.shape
    m, k = (ca, ra) if transpose_a else (ra, ca)
    kb, n = (cb, b_rows) if transpose_b else (b_rows, cb)
    if k != kb or b.shape[0] != batch:
        raise ValueError(f"batched_matmul: shapes {a.shape} and {b.shape} (rows {b_rows}) do not multiply")
    if accumulate is None:
        operands, out_shape, aliases, beta = (a, b), (batch, m, n), {}, 0
    else:
        if accumulate.shape[0] != batch or accumulate.shape[1] < m or accumulate.shape[2] != n:
            raise ValueError(f"batched_matmul: cannot add [{batch}, {m}, {n}] into {accumulate.shape}")
        operands, out_shape, aliases, beta = (a, b, accumulate), accumulate.shape, {2: 0}, 1
    rows_c = out_shape[1]
    config = (int(transpose_a), int(transpose_b), m, n, k, ca, ra * ca, cb, rb * cb, n, rows_c * n, batch, beta)
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32), custom_call_api_version=3,
                            legacy_backend_config=",".join(map(str, config)), input_output_aliases=aliases)
    return call(*operands)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """range(n) in at most `parts` contiguous, near-equal, non-empty pieces."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _Workers:
    """Runs a call's pieces on the calling thread and count-1 pool threads, which sleep between calls
    (OpenBLAS's own threads would spin). Each thread takes the next piece when done with one, so a
    helper the OS wakes late (the other core busy with an XLA op) leaves its share to the calling
    thread instead of finishing a fixed half last; the pieces are fixed, so results do not depend on
    which thread computes them. One call at a time: XLA may issue two custom calls at once."""

    def __init__(self, count: int):
        self.count = count
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(count - 1, thread_name_prefix="lima-sgemm") if count > 1 else None

    def run(self, fn, jobs):
        with self._lock:
            pieces = iter(jobs)  # shared: a list iterator hands each piece out once, under the GIL

            def work():
                for args in pieces:
                    fn(*args)

            pending = [self._pool.submit(work) for _ in range(min(self.count, len(jobs)) - 1)]
            work()
            for future in pending:
                future.result()


def _register() -> None:
    with _registering:
        if not _registered:
            _registered.extend(_load_and_register())


def _load_and_register() -> tuple:
    import scipy_openblas32

    lib = ctypes.CDLL(f"{scipy_openblas32.get_lib_dir()}/{scipy_openblas32.get_library(fullname=True)}")
    gemm = lib.scipy_cblas_sgemm_batch_strided
    c_int, c_float, c_void_p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    gemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, c_void_p, c_int, c_int, c_void_p, c_int,
                     c_int, c_float, c_void_p, c_int, c_int, c_int]
    gemm.restype = None
    lib.scipy_openblas_set_num_threads(1)  # its idle threads spin ~0.1 s, slowing XLA's next ops
    workers = _Workers(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def run(out, ins, opaque, opaque_len, status):
        # A Python exception here would only be printed by ctypes, never reach XLA: nothing below
        # can raise on a configuration _sgemm_batch wrote.
        ta, tb, m, n, k, lda, sa, ldb, sb, ldc, sc, batch, beta = (
            int(v) for v in ctypes.string_at(opaque, opaque_len).split(b","))
        if not (m and n and batch):  # an empty result: nothing to write (and XLA may pass null buffers)
            return
        jobs = []
        if batch > 1:  # whole matrices per piece, a few pieces per thread
            for lo, hi in _split(batch, _PIECES_PER_THREAD * workers.count):
                jobs.append((m, ins[0] + 4 * lo * sa, ins[1] + 4 * lo * sb, out + 4 * lo * sc, hi - lo))
        else:  # rows of the one result (rows of op(a): columns of a if transposed); one piece per
            # thread, since every piece packs all of b again
            for lo, hi in _split(m, workers.count):
                jobs.append((hi - lo, ins[0] + 4 * (lo if ta else lo * lda), ins[1], out + 4 * lo * ldc, 1))
        workers.run(gemm, [(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, rows, n, k,
                            1.0, a, lda, sa, b, ldb, sb, float(beta), c, ldc, sc, count)
                           for rows, a, b, c, count in jobs])

    callback = ctypes.CFUNCTYPE(None, c_void_p, ctypes.POINTER(c_void_p), c_void_p, ctypes.c_size_t, c_void_p)(run)
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype, capsule_new.argtypes = ctypes.py_object, [c_void_p, ctypes.c_char_p, c_void_p]
    capsule = capsule_new(ctypes.cast(callback, c_void_p), b"xla._CUSTOM_CALL_TARGET", None)
    jax.ffi.register_ffi_target(_TARGET, capsule, platform="cpu", api_version=0)
    return lib, callback


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, blas: bool = False) -> jax.Array:
    """x [m, k] @ op(w), w [k, n] (or [n, k] with transpose_w): float32 [m, n]. With blas and float32
    operands, the product and both of its gradients are OpenBLAS custom calls; otherwise an XLA dot."""
    if blas and x.dtype == w.dtype == jnp.float32:
        return _blas_matmul(x, w, transpose_w)
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blas_matmul(x, w, transpose_w):
    return batched_matmul(x[None], w[None], transpose_b=transpose_w, blas=True)[0]


def _blas_matmul_fwd(x, w, transpose_w):
    return _blas_matmul(x, w, transpose_w), (x, w)


def _blas_matmul_bwd(transpose_w, residuals, g):
    x, w = residuals
    g = g[None]
    dx = batched_matmul(g, w[None], transpose_b=not transpose_w, blas=True)[0]
    if transpose_w:  # w [n, k]: dw = gᵀ x
        dw = batched_matmul(g, x[None], transpose_a=True, blas=True)[0]
    else:  # w [k, n]: dw = xᵀ g
        dw = batched_matmul(x[None], g, transpose_a=True, blas=True)[0]
    return dx, dw


_blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)
