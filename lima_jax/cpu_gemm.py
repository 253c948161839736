"""Float32 matrix products through a BLAS (MKL or OpenBLAS), as XLA custom calls, for one-device CPU
programs (lima-train's step on one CPU device).

The LM head's wide product (2048 × 512 by 512 × 32000 and its two gradients) ran 8-16% faster through
OpenBLAS than as XLA:CPU's Eigen dots (2-core EPYC, measured in one process). On an AVX-512 Xeon,
MKL's kernels beat both Eigen and OpenBLAS; there the layers' 2-D products go through it as well
(`layers_enabled`): in paired runs of the 58M step, 4-7% faster than with OpenBLAS. Through OpenBLAS,
split by rows, the layers' products were slower than XLA's dots, so they stay dots there. Attention
has fused calls of its own (attention.py), which multiply through the same BLAS.

`batched_matmul` is op(a) @ op(b[:, :b_rows]) for a batch of matrices, optionally added into the
leading rows of an accumulator. As a custom call it reads b's row prefix where it lies and adds into
the accumulator in place (its buffer is the output), so no slice or update is copied. `matmul` is a
differentiable 2-D product on top of it, for the LM head and the layers.

How: the custom call is our C function (csrc/sgemm_call.c, in the extension module `_cpu_calls`), in
XLA's "status returning, unified" convention; the opaque string carries the product's shape, strides
and beta. It never takes Python's lock. The same library holds attention's fused calls (attention.py,
csrc/attention_call.c); this module loads it and registers them all (`target`).

`blas_backend()` picks the BLAS once per process: MKL, from torch's own library (torch bundles it),
on Intel CPUs where torch is installed; otherwise OpenBLAS from the `scipy-openblas32` wheel;
$LIMA_JAX_CPU_BLAS overrides ("mkl", "openblas", "xla" for none). The BLAS runs single-threaded on the
calling XLA thread and helper threads of ours that sleep between calls (OpenBLAS's own threads spin
for ~0.1 s after each call, which slowed XLA's next ops); MKL gets a single product whole, with its own
threads. The split is fixed, so results are deterministic.

Only for programs that run on one CPU device: a custom call has no sharding rule, so a sharded program
would gather its operands. `enabled(True)` turns it on while a program is traced; otherwise, and for
non-float32 operands, `batched_matmul` is an XLA dot. The flag reaches `batched_matmul` as an
argument (`blas`) and attention reads it when traced, so JAX's caches of traced functions keep the
two apart.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import threading
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

from lima_jax import cpu_tuning

_PREFIX = "lima_jax_"  # of our calls' XLA target names
_CALLS = {"sgemm_batch_strided": "lima_sgemm_call", "attention_forward": "lima_attention_forward",
          "attention_backward": "lima_attention_backward"}  # name → the C function (csrc/)
BACKEND_ENV = "LIMA_JAX_CPU_BLAS"
_tracing = threading.local()
# The BLAS's name, it and our C library (loaded as long as XLA may call them), and the library's threads.
_registered: list = []
_registering = threading.Lock()


def target(name: str) -> str:
    """The XLA target of our C call `name` (a key of _CALLS), registered."""
    _register()
    return _PREFIX + name


def threads() -> int:
    """Threads our calls run on (the calling XLA thread and helpers), fixed when the library was
    loaded: the CPUs this process could use then."""
    _register()
    return _registered[3]


def available() -> bool:
    """Whether the custom calls can be registered here (our C call was built, the BLAS loads, and
    $LIMA_JAX_CPU_BLAS is not "xla")."""
    try:
        _register()
    except (ImportError, OSError, AttributeError):
        if os.environ.get(BACKEND_ENV, "").strip().lower() in ("mkl", "openblas"):
            raise  # asked for by name: say why it cannot be had
        return False
    return True


def backend() -> Optional[str]:
    """The BLAS behind this process's custom call, "mkl" or "openblas"; None if there is none."""
    return _registered[0] if available() else None


def usable_on(mesh) -> bool:
    """Whether a program over `mesh` should use the custom call: one CPU device, `available()`."""
    return cpu_tuning.one_cpu_device(mesh) and available()


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Marks the programs traced within this context as one-device CPU programs that may use the BLAS
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


def layers_enabled() -> bool:
    """Whether the layers' 2-D products (not only attention's and the LM head's) go through the BLAS
    in the program being traced: within `enabled()`, with MKL. MKL's own threads split a single
    product well; OpenBLAS's products, split by rows, ran slower there than XLA's dots."""
    return is_enabled() and backend() == "mkl"


def batched_matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
                   b_rows: Optional[int] = None, accumulate: Optional[jax.Array] = None,
                   preferred_element_type=None, blas: bool = False) -> jax.Array:
    """op(a[i]) @ op(b[i, :b_rows]) for each i, with a [batch, ·, ·], b [batch, rows, ·] and op a
    transpose where asked: [batch, m, n]. With `accumulate` [batch, R ≥ m, n], returns it with the
    product added to its first m rows. blas: one BLAS custom call if the operands are float32
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
    call = jax.ffi.ffi_call(target("sgemm_batch_strided"), jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            custom_call_api_version=3, legacy_backend_config=",".join(map(str, config)),
                            input_output_aliases=aliases)
    return call(*operands)


def _register() -> None:
    with _registering:
        if not _registered:
            _registered.extend(_load_and_register())


def _load_and_register() -> tuple:
    from lima_jax import _cpu_calls  # our C custom calls (csrc/), built by pip

    backend = blas_backend()
    if backend == "xla":
        raise ImportError(f"{BACKEND_ENV}=xla: no BLAS custom call")
    sgemm, set_threads, library = _mkl() if backend == "mkl" else _openblas()
    calls = ctypes.CDLL(_cpu_calls.__file__)
    calls.lima_cpu_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if calls.lima_cpu_init(sgemm, set_threads, threads, int(backend == "mkl")) != 0:
        raise OSError("cpu_gemm: could not start the custom calls' helper threads")
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype = ctypes.py_object
    capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    for name, symbol in _CALLS.items():
        address = ctypes.cast(getattr(calls, symbol), ctypes.c_void_p)
        jax.ffi.register_ffi_target(_PREFIX + name, capsule_new(address, b"xla._CUSTOM_CALL_TARGET", None),
                                    platform="cpu", api_version=0)
    return backend, library, calls, threads


def blas_backend() -> str:
    """The BLAS behind the custom call: $LIMA_JAX_CPU_BLAS if set ("mkl", "openblas", or "xla" for
    none), else MKL on an Intel CPU where torch (which bundles MKL) is installed, else OpenBLAS."""
    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen:
        if chosen not in ("mkl", "openblas", "xla"):
            raise ValueError(f"{BACKEND_ENV}={chosen!r}: expected mkl, openblas or xla")
        return chosen
    return "mkl" if _intel_cpu() and _torch_library() else "openblas"


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


def _torch_library() -> Optional[str]:
    """torch's libtorch_cpu.so, which carries MKL, if torch is installed (found without importing it)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libtorch_cpu.so")
    return path if os.path.exists(path) else None


def _mkl() -> tuple:
    path = _torch_library()
    if path is None:
        raise ImportError(f"{BACKEND_ENV}=mkl needs torch installed (its libtorch_cpu.so carries MKL)")
    library = ctypes.CDLL(path)
    return (ctypes.cast(library.sgemm_, ctypes.c_void_p).value,
            ctypes.cast(library.MKL_SET_NUM_THREADS_LOCAL, ctypes.c_void_p).value, library)


def _openblas() -> tuple:
    import scipy_openblas32

    library = ctypes.CDLL(f"{scipy_openblas32.get_lib_dir()}/{scipy_openblas32.get_library(fullname=True)}")
    library.scipy_openblas_set_num_threads(1)  # its idle threads spin ~0.1 s, slowing XLA's next ops
    return ctypes.cast(library.scipy_sgemm_, ctypes.c_void_p).value, None, library


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, blas: bool = False) -> jax.Array:
    """x [m, k] @ op(w), w [k, n] (or [n, k] with transpose_w): float32 [m, n]. With blas and float32
    operands, the product and both of its gradients are BLAS custom calls; otherwise an XLA dot."""
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
