"""Causal self-attention within segments through cuDNN's fused flash attention, the NVIDIA GPU's
kernel (`attention_kernel="cudnn"`): same inputs and outputs as attention.causal_attention.

Why a kernel beside attention.py: XLA's blocked attention writes each block's scores and
probabilities to GPU memory; cuDNN's flash attention keeps them on chip, skips the blocks the causal
mask removes and has its own backward kernels. The kernel is JAX's
(`jax.nn.dot_product_attention(..., implementation="cudnn")`); this module only decides which rows it
can take. What it supports in jax 0.10.2, and what this module does about it:
- heads: grouped-query attention natively (query heads a multiple of kv heads), in our [B, T, heads,
  head_dim] layout, scaled by 1/√head_dim;
- masks: causal (`is_causal`) with a length per row (`query_seq_lengths`, `key_value_seq_lengths`: the
  real tokens are a prefix). There are no segment ids: a row packing several examples could only be
  told apart by a dense [B, 1, T, T] mask, which cuDNN takes as a bias it reads for every head and
  whose gradient it writes, and jax's packed layout (per-segment offsets, Hopper only) is private
  API. So a batch whose every row is one segment from position 0 followed by padding (unpacked rows)
  runs on cuDNN with those lengths; any other batch on this device (packed or left-padded rows) runs
  attention.causal_attention, chosen at run time by `lax.cond`. Packed training therefore runs XLA's
  attention on GPUs too;
- dtypes and sizes: cuDNN takes bfloat16/float16 and head_dim a multiple of 8 up to 128; on cuDNN,
  float32 (parity checks, `lm.logits` in float32) and other head sizes run attention.causal_attention,
  chosen when tracing (jax's "xla" implementation takes any);
- sharding: XLA partitions the cuDNN call only when q, k and v split alike, which grouped kv heads do
  not when there are fewer of them than the tensor axis; under a mesh it runs through
  sharding.per_device_attention (shard_map: rows and heads per device, the sequence whole);
- platform: the caller picks `implementation`; "xla" runs jax's own implementation of the very same
  call (so the call is tested on the CPU), "cudnn" needs a CUDA GPU (or a lowering for one). ROCm
  GPUs, whose platform is "gpu" too, have no cuDNN: set attention_kernel="xla" there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lima_jax import sharding
from lima_jax.attention import causal_attention, check_shapes

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every GPU cuDNN's flash attention runs on


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN's flash attention takes q, k, v of this dtype and head size."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim % 8 == 0 \
        and head_dim <= MAX_HEAD_DIM


def prefix_lengths(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lengths [B] int32, all_prefix scalar bool): each row's count of real tokens (at least 1), and
    whether every row's real tokens are one segment that starts at position 0 (the rest padding).
    An empty row counts as length 1: its outputs are padding, which nothing reads."""
    real = segment_ids > 0
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
    prefix = jnp.arange(segment_ids.shape[1])[None, :] < lengths[:, None]
    one_segment = jnp.where(real, segment_ids == segment_ids[:, :1], True)
    return jnp.maximum(lengths, 1), jnp.all(real == prefix) & jnp.all(one_segment)


def _local(q, k, v, segment_ids, implementation: str, block: int):
    """The kernel on unsharded (or one device's) q [B,T,H,D], k/v [B,T,KVH,D], segment_ids [B,T]."""
    if implementation == "cudnn" and not cudnn_supports(q.dtype, q.shape[-1]):
        return causal_attention(q, k, v, segment_ids, block=block)
    lengths, unpacked = prefix_lengths(segment_ids)

    def fused():
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, implementation=implementation)

    return jax.lax.cond(unpacked, fused, lambda: causal_attention(q, k, v, segment_ids, block=block))


def cudnn_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                           implementation: str = "cudnn", block: int = 128) -> jax.Array:
    """attention.causal_attention's result, through cuDNN where it applies (see the module's notes): q
    [B,T,H,D], k/v [B,T,KVH,D] (H a multiple of KVH), segment_ids [B,T] int (0 = padding) → [B,T,H,D].
    Query i sees key j when j <= i and both share a segment id; padding queries' outputs are not
    meaningful. implementation: "cudnn", or "xla" (jax's implementation of the same call, off GPU).
    block: query rows per block of the XLA attention, where it runs."""
    check_shapes("cudnn", q, k, v, segment_ids)
    if implementation not in ("cudnn", "xla"):
        raise ValueError(f"implementation={implementation!r}; expected 'cudnn' or 'xla'")
    local = functools.partial(_local, implementation=implementation, block=block)
    return sharding.per_device_attention(local, q, k, v, segment_ids.astype(jnp.int32))
