"""Settings that make XLA:CPU runs of this project (the demo, tests, small models, benchmarks)
faster. None touches TPU programs; only the train steps' reduction option changes a result, by
float32 rounding (see below).

- Compiler options for CPU executables: XLA:CPU hands dot products to YNNPACK by default, whose
  kernels run the batched attention products of training 2-3x slower than Eigen's and the
  matrix-vector products of a decode step ~1.4x slower (measured on a 2-core EPYC, 58M LLaMA).
- For train steps, no tree-reduction rewrite: XLA:CPU turns every reduction over more than 32
  elements into a 32-wide reduce-window and a second reduce. A 58M train step had 161 of them
  (attention's row max and sum, RMSNorm, the logits' softmax), ~240 ms of a ~5 s profiled step;
  XLA's plain reduce does the same sums faster. In paired A/B runs on a 2-core Xeon the step was
  1.027x and 1.082x faster (10 and 14 steps; identical programs there read 0.955x-1.011x). Its
  sums are sequential per vector lane instead of in runs of 32: at most a few float32 ulps apart.
- `keep_freed_memory()`: glibc returns every freed block over 32 MiB to the kernel, so large
  temporaries are page-faulted in afresh at every use, which made a memory-bound pass ~4x slower.
  Keeping freed memory in the heap reuses it. XLA runs its programs on threads of their own, whose
  heaps map blocks over 64 MiB afresh regardless; `one_heap=True` (lima-train) moves them to the main
  heap too, which saved the 1.2 GB of page faults of every 58M train step (~20% of the step) but made
  batch-8 decoding ~15% slower (measured; likely its many small allocations contending for the one
  heap's lock), so decoding keeps its heaps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

import jax

# An empty list of YNNPACK fusion kinds: no op goes to YNNPACK, dots go to Eigen.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
TRAIN_CPU_COMPILER_OPTIONS = {**CPU_COMPILER_OPTIONS, "xla_disable_hlo_passes": "tree_reduction_rewriter"}

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters from glibc's malloc.h


def compiler_options(platform: Optional[str] = None, *, training: bool = False) -> Optional[dict]:
    """Options for `jax.jit(..., compiler_options=...)` on `platform` (default: JAX's default
    backend): the CPU ones on "cpu" (with training, a train step's), None elsewhere."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    return dict(TRAIN_CPU_COMPILER_OPTIONS if training else CPU_COMPILER_OPTIONS)


def one_cpu_device(mesh) -> bool:
    """Whether a program over `mesh` runs on a single CPU device (where lima-train's CPU-only choices
    apply: BLAS products)."""
    return mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"


class PlatformJit:
    """`jax.jit(fn, **jit_kwargs)` twice: with the CPU options for CPU arrays, plainly for the rest.
    `.on(platform)` picks one; each compiles (and caches) only when first called."""

    def __init__(self, fn, **jit_kwargs):
        self._cpu = jax.jit(fn, compiler_options=dict(CPU_COMPILER_OPTIONS), **jit_kwargs)
        self._other = jax.jit(fn, **jit_kwargs)

    def on(self, platform: str):
        return self._cpu if platform == "cpu" else self._other


def keep_freed_memory(platform: Optional[str] = None, *, one_heap: bool = False) -> bool:
    """On "cpu" (default: JAX's default backend), asks glibc never to serve allocations from fresh
    mappings nor to shrink the heap, so freed buffers are reused instead of unmapped and faulted in
    again. With one_heap, every thread allocates from the main heap (see the module docstring).
    Process-wide; the process keeps its peak memory until it exits (fine for a training or decoding
    run).

    For one_heap, call it before JAX starts its backend (before the first `jax.devices()`): a thread
    keeps the heap it first allocated from, and XLA's threads start with the backend. With
    platform=None this call starts the backend itself, after the switch, and undoes the switch if the
    backend is not the CPU. Returns False (nothing changed) where the C library is not glibc or the
    platform is not the CPU. lima-train (one_heap), lima-decode, lima-chat and the demo call it."""
    if platform not in (None, "cpu"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if one_heap and not mallopt(_M_ARENA_MAX, 1):  # threads started from now on share the main heap
        return False
    if (platform or jax.default_backend()) != "cpu":
        if one_heap:
            mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))  # glibc's own limit for 64-bit hosts
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
