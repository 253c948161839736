"""Two settings that make XLA:CPU runs of this project (the demo, tests, small models, benchmarks)
faster. Neither changes a result, and neither touches TPU programs.

- Compiler options for CPU executables: XLA:CPU hands dot products to YNNPACK by default, whose
  kernels run the batched attention products of training 2-3x slower than Eigen's and the
  matrix-vector products of a decode step ~1.4x slower (measured on a 2-core EPYC, 58M LLaMA).
- `keep_freed_memory()`: glibc returns every freed block over 32 MiB to the kernel, so each step's
  large temporaries (a [B·T, vocab] float32 logits buffer is 262 MB at 4 x 512) are page-faulted
  in afresh, which made a memory-bound pass ~4x slower. Keeping freed memory in the heap reuses it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import jax

# An empty list of YNNPACK fusion kinds: no op goes to YNNPACK, dots go to Eigen.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h


def compiler_options(platform: Optional[str] = None) -> Optional[dict]:
    """Options for `jax.jit(..., compiler_options=...)` on `platform` (default: JAX's default
    backend): the CPU ones on "cpu", None elsewhere."""
    platform = platform or jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


class PlatformJit:
    """`jax.jit(fn, **jit_kwargs)` twice: with the CPU options for CPU arrays, plainly for the rest.
    `.on(platform)` picks one; each compiles (and caches) only when first called."""

    def __init__(self, fn, **jit_kwargs):
        self._cpu = jax.jit(fn, compiler_options=dict(CPU_COMPILER_OPTIONS), **jit_kwargs)
        self._other = jax.jit(fn, **jit_kwargs)

    def on(self, platform: str):
        return self._cpu if platform == "cpu" else self._other


def keep_freed_memory(platform: Optional[str] = None) -> bool:
    """On "cpu" (default: JAX's default backend), asks glibc to serve every allocation from the
    heap and never shrink it, so freed buffers are reused instead of unmapped and faulted in again.
    Process-wide; the process keeps its peak
    memory until it exits (fine for a training or decoding run). Returns False where the C library
    is not glibc or the platform is not the CPU (nothing is changed then). lima-train, lima-decode,
    lima-chat and the demo call it; library users may too."""
    if (platform or jax.default_backend()) != "cpu":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
