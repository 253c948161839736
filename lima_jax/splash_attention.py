"""Causal self-attention within segments through JAX's Pallas splash-attention kernel, the TPU's
fused attention (`attention_kernel="splash"`): same inputs and outputs as attention.causal_attention.

Why a kernel beside attention.py: on TPU, XLA's blocked attention writes each block's scores and
probabilities to HBM; splash keeps them in VMEM and skips the blocks the causal mask removes, forward
and backward (its own custom VJP). The kernel is JAX's maintained one
(`jax.experimental.pallas.ops.tpu.splash_attention`); this module only adapts layouts, masks and
sharding to it:
- heads: the kernel's multi-head form takes kv heads that divide the query heads (GQA natively);
- segments: its SegmentIds (query and key must share an id) and'ed with a static causal mask. A
  padding token (id 0) then attends to earlier padding, never to a real token and never the reverse,
  so every real query's output and gradient are the XLA attention's; padding's own outputs differ
  from attention.py's, and nothing reads them;
- scale: the kernel does not scale the scores, so q is multiplied by 1/√head_dim first;
- length: its blocks are multiples of 128 (the TPU's lanes), so a row whose length is not is padded
  with id-0 tokens up to one, and the result cut back;
- sharding: Mosaic kernels cannot be partitioned by XLA, so inside `sharding.use_rules` with a mesh of
  several devices the kernel runs under `jax.shard_map`, each device on its rows (the `batch` rule)
  and heads (`heads`/`kv_heads`), the sequence whole;
- platform: off TPU it runs in Pallas' interpret mode (slow; for tests on the CPU).
"""
from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lima_jax import sharding
from lima_jax.attention import check_shapes

LANES = 128  # the kernel's key blocks must be multiples of the TPU's 128 lanes
BLOCK_SIZES = (512, 256, 128)  # the largest that divides the (padded) length is used


def block_size(length: int) -> int:
    """Query and key rows per kernel block for rows of `length` tokens (a multiple of LANES)."""
    for block in BLOCK_SIZES:
        if length % block == 0:
            return block
    raise ValueError(f"splash attention needs a length that is a multiple of {LANES}, got {length}")


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, interpret: bool):
    """The kernel for one row's [heads, length, head_dim] queries: its causal mask's block tables are
    built with numpy once per shape, not at every trace (the unrolled layer loop traces each layer).
    They are made concrete arrays (compile-time evaluation) because the kernel is first built inside a
    trace and kept for later ones, which must not see that trace's values."""
    b = block_size(length)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q, k, v, segment_ids, interpret: bool):
    """The kernel on unsharded (or one device's) q [B,T,H,D], k/v [B,T,KVH,D], segment_ids [B,T]."""
    b, t, h, d = q.shape
    padded = -(-t // LANES) * LANES
    if padded != t:  # id 0: padding, which no real query sees
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - t)))
    kernel = _kernel(h, padded, interpret)
    q = (q * (1.0 / math.sqrt(d))).astype(q.dtype)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # the kernel's [heads, T, D] per row

    def row(q, k, v, ids):
        return kernel(q, k, v, splash.SegmentIds(q=ids, kv=ids))

    out = jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out)[:, :t]


def splash_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                            interpret: bool = False) -> jax.Array:
    """attention.causal_attention's result through the splash kernel: q [B,T,H,D], k/v [B,T,KVH,D] (H a
    multiple of KVH), segment_ids [B,T] int (0 = padding) → [B,T,H,D]. Query i sees key j when j <= i
    and both share a segment id; padding queries' outputs are not meaningful. interpret: Pallas'
    interpreter, also chosen whenever the platform is not TPU."""
    check_shapes("splash", q, k, v, segment_ids)
    interpret = bool(interpret) or sharding.platform() != "tpu"
    local = functools.partial(_local, interpret=interpret)
    return sharding.per_device_attention(local, q, k, v, segment_ids.astype(jnp.int32))


# Matrix products per computed (query block, key block) pair in each of the kernel's programs: the
# forward QKᵀ and PV; dq recomputes QKᵀ, then dO·Vᵀ and dS·K; dkv recomputes QKᵀ, then dO·Vᵀ, Pᵀ·dO
# and dSᵀ·Q.
KERNEL_PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4}
_KERNEL_NAME = re.compile(r'kernel_name = "splash_mha_(fwd|dq|dkv)_')
_TENSOR = re.compile(r"tensor<((?:\d+x)+)(?:bf16|f32|f16)>")


def kernel_flops(call_line: str) -> float:
    """The flops of one splash kernel call, from its line in a lowered (StableHLO) module; 0 for any
    other custom call. The TPU compiler's cost model cannot see into Mosaic kernels (it counts their
    bytes, not their products), so lima-aot adds these. Operands: q [rows, heads, T, D] is the first
    float tensor of 3 or more dimensions, k [rows, kv_heads, S, D] the second (`rows` absent when a
    device holds one row); our causal mask computes the blocks on and below the diagonal: (n + 1) / 2n
    of them for n blocks a side."""
    kind = _KERNEL_NAME.search(call_line)
    if not kind:
        return 0.0
    operands = call_line.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
    shapes = [tuple(int(x) for x in m.group(1).rstrip("x").split("x")) for m in _TENSOR.finditer(operands)]
    q, k = [s for s in shapes if len(s) >= 3][:2]
    t, s_len, d = q[-2], k[-2], q[-1]
    n = s_len // block_size(s_len)
    return KERNEL_PRODUCTS[kind.group(1)] * 2.0 * math.prod(q[:-2]) * t * s_len * d * (n + 1) / (2 * n)
