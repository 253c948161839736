"""Causal self-attention for training and prefill-free forward passes.

Two implementations of one algorithm (FlashAttention's, in query blocks):
- One-device CPU training in float32 (within `cpu_gemm.enabled()`): two fused custom calls of ours,
  forward and backward (csrc/attention_call.c), which keep each block's scores in cache. A 58M
  layer's attention forward + backward (4 × 512 tokens) took 52-58 ms against 124 ms for the XLA
  version (AVX-512 Xeon, 2 cores, one process).
- Everywhere else (TPU, sharded programs, bfloat16): XLA ops, below.

Query block i only attends to the keys up to its own end, so the product with the keys the causal
mask would remove anyway is never computed (~40% less work at 4+ blocks). The backward pass is
written by hand: it keeps q, k, v, the output and one log-normaliser per query, and recomputes each
block's probabilities, instead of keeping every layer's [heads, T, T] scores and probabilities for the
gradient, which XLA:CPU spends more time writing and reading than multiplying.

In the XLA version heads are grouped next to the batch ([B·KVH, G·rows, D]) so every product is a
plain batched matmul.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from lima_jax import cpu_gemm

_MIN = jnp.finfo(jnp.float32).min


def query_blocks(length: int, block: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(length) in blocks of at most `block` rows."""
    return [(s, min(s + block, length)) for s in range(0, length, block)]


def _group(x, kvh):
    """[B, T, KVH·G, D] → [B·KVH, G, T, D]."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4).reshape(b * kvh, h // kvh, t, d)


def _ungroup(x, b):
    """[B·KVH, G, T, D] → [B, T, KVH·G, D]."""
    bk, g, t, d = x.shape
    return x.reshape(b, bk // b, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, bk // b * g, d)


_product = partial(cpu_gemm.batched_matmul, preferred_element_type=jnp.float32)  # an XLA dot


def _block_scores(q, k, mask, start, end, scale):
    """Scores of query rows [start, end) against keys [0, end): [BK, G, rows, end] float32, masked
    entries at float32's minimum. A row that sees no key (left padding) gets weight 1 on each key in
    [0, end) (its log-normaliser rounds back to that minimum); it is padding, whose output no other
    position reads."""
    bk, g, _, d = q.shape
    rows = end - start
    qb = q[:, :, start:end].reshape(bk, g * rows, d)
    s = _product(qb, k, transpose_b=True, b_rows=end)
    b = mask.shape[0]
    s = jnp.where(mask[:, None, None, start:end, :end], s.reshape(b, bk // b, g, rows, end) * scale, _MIN)
    return s.reshape(bk, g, rows, end)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_attention(q, k, v, mask, block):
    return _forward(q, k, v, mask, block)[0]


def _forward(q, k, v, mask, block):
    """q [BK, G, T, D], k/v [BK, T, D] (BK = B·KVH, kv heads minor), mask [B, T, T]."""
    bk, g, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    outs, lses = [], []
    for start, end in query_blocks(t, block):
        s = _block_scores(q, k, mask, start, end, scale)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        p = jnp.exp(s - lse).astype(v.dtype).reshape(bk, g * (end - start), end)
        outs.append(cpu_gemm.batched_matmul(p, v, b_rows=end).reshape(bk, g, end - start, d))
        lses.append(lse)
    out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return out, (q, k, v, mask, out, lse)


def _backward(block, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    bk, g, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    # delta_i = Σ_j p_ij dp_ij = d_out_i · out_i: the softmax gradient's row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in query_blocks(t, block):
        rows = end - start
        s = _block_scores(q, k, mask, start, end, scale)
        p = jnp.exp(s - lse[:, :, start:end])  # [BK, G, rows, end]
        do = d_out[:, :, start:end].reshape(bk, g * rows, d)
        p2 = p.astype(v.dtype).reshape(bk, g * rows, end)
        dv = _product(p2, do, transpose_a=True, accumulate=dv)
        dp = _product(do, v, transpose_b=True, b_rows=end).reshape(p.shape)
        ds = (p * (dp - delta[:, :, start:end]) * scale).astype(q.dtype).reshape(bk, g * rows, end)
        dq_blocks.append(_product(ds, k, b_rows=end).reshape(bk, g, rows, d))
        qb = q[:, :, start:end].reshape(bk, g * rows, d)
        dk = _product(ds, qb, transpose_a=True, accumulate=dk)
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_attention.defvjp(_forward, _backward)


# Query rows per piece of our fused calls (the XLA version uses the config's attention_block): in the
# 58M benchmark's shapes, forward + backward took 4-26% less time with 64 than with 128 rows (three
# runs, AVX-512 Xeon; 32 was no better than 64).
FUSED_BLOCK = 64


def _fused_call(name: str, results: list, *operands, block: int):
    """Our C call `name` (cpu_gemm.target) on q, k, v, mask, ...: the given float32 results, plus the
    per-thread scratch buffers it works in (dropped)."""
    b, t, h, d = operands[0].shape
    threads = cpu_gemm.threads()
    config = (b, t, h, operands[1].shape[2], d, block, threads)
    scratch = (threads, 2, min(block, t), t)
    call = jax.ffi.ffi_call(cpu_gemm.target(name), [jax.ShapeDtypeStruct(r, jnp.float32) for r in results + [scratch]],
                            custom_call_api_version=3, legacy_backend_config=",".join(map(str, config)))
    return call(*operands)[:-1]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_attention(q, k, v, mask, block):
    return _fused_forward(q, k, v, mask, block)[0]


def _fused_forward(q, k, v, mask, block):
    b, t, h, _ = q.shape
    out, lse = _fused_call("attention_forward", [q.shape, (b, h, t)], q, k, v, mask, block=block)
    return out, (q, k, v, mask, out, lse)


def _fused_backward(block, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    dq, dk, dv = _fused_call("attention_backward", [q.shape, k.shape, v.shape], q, k, v, mask, out, lse, d_out,
                             block=block)
    return dq, dk, dv, None


_fused_attention.defvjp(_fused_forward, _fused_backward)


def causal_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, *,
                     block: int = 128) -> jax.Array:
    """softmax(q·kᵀ/√d + mask)·v for q [B,T,H,D], keys/values [B,T,KVH,D] (H a multiple of KVH) and
    mask [B,T,T] bool (True = may attend), which must be causal: no query sees a later key. Traced
    within `cpu_gemm.enabled()` with float32 operands, it is our fused custom calls. Rows that see no
    key (left padding) are padding: their output differs between the two versions."""
    b, t, h, d = q.shape
    kvh = keys.shape[2]
    if keys.shape[1] != t:
        raise ValueError(f"causal_attention needs as many keys as queries, got {keys.shape[1]} and {t}")
    if mask.shape != (b, t, t):
        raise ValueError(f"causal_attention needs a mask of shape {(b, t, t)}, got {mask.shape}")
    if cpu_gemm.is_enabled() and q.dtype == keys.dtype == values.dtype == jnp.float32:
        return _fused_attention(q, keys, values, mask.astype(bool), FUSED_BLOCK)
    kg = _group(keys, kvh)[:, 0]  # [B·KVH, T, D]
    vg = _group(values, kvh)[:, 0]
    return _ungroup(_causal_attention(_group(q, kvh), kg, vg, mask, block), b)
