"""Causal self-attention within segments, for training and prefill-free forward passes: one XLA
implementation (FlashAttention's algorithm, in query blocks) that every backend runs.

A row may hold several examples (packing): each token carries a segment id, and a query attends to
the keys at or before it with its own segment id; id 0 is padding, which no query attends to. The
mask is built inside each block from the ids, never as a [B, T, T] array. An unpacked row is one
segment (ids 1 for its tokens, 0 for padding).

Query block i only attends to the keys up to its own end, so the product with the keys the causal
mask would remove anyway is never computed (~40% less work at 4+ blocks). The backward pass is
written by hand: it keeps q, k, v, the output and one log-normaliser per query, and recomputes each
block's probabilities, instead of keeping every layer's [heads, T, T] scores and probabilities for the
gradient.

Heads are grouped next to the batch ([B·KVH, G, T, D]) so every product is a plain batched matmul
over the kv heads' groups.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

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


def _product(spec: str, a, b):
    """einsum with float32 accumulation (operands may be bfloat16)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _block_mask(segments, start, end):
    """[B, rows, end] bool: query i in [start, end) may see key j < end (j <= i, same segment, not padding)."""
    causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    q_seg, k_seg = segments[:, start:end, None], segments[:, None, :end]
    return causal[None] & (q_seg == k_seg) & (k_seg > 0)


def _block_scores(q, k, segments, start, end, scale):
    """Scores of query rows [start, end) against keys [0, end): [BK, G, rows, end] float32, masked
    entries at float32's minimum. A row that sees no key (padding) gets weight 1 on each key in
    [0, end) (its log-normaliser rounds back to that minimum); it is padding, whose output no other
    position reads."""
    bk, g, _, _ = q.shape
    rows = end - start
    s = _product("bgqd,bkd->bgqk", q[:, :, start:end], k[:, :end])
    b = segments.shape[0]
    mask = _block_mask(segments, start, end)
    s = jnp.where(mask[:, None, None], s.reshape(b, bk // b, g, rows, end) * scale, _MIN)
    return s.reshape(bk, g, rows, end)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_attention(q, k, v, segments, block):
    return _forward(q, k, v, segments, block)[0]


def _forward(q, k, v, segments, block):
    """q [BK, G, T, D], k/v [BK, T, D] (BK = B·KVH, kv heads minor), segments [B, T] int."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for start, end in query_blocks(q.shape[2], block):
        s = _block_scores(q, k, segments, start, end, scale)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        p = jnp.exp(s - lse).astype(v.dtype)
        outs.append(_product("bgqk,bkd->bgqd", p, v[:, :end]).astype(v.dtype))
        lses.append(lse)
    out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return out, (q, k, v, segments, out, lse)


def _backward(block, residuals, d_out):
    q, k, v, segments, out, lse = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    # delta_i = Σ_j p_ij dp_ij = d_out_i · out_i: the softmax gradient's row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in query_blocks(q.shape[2], block):
        s = _block_scores(q, k, segments, start, end, scale)
        p = jnp.exp(s - lse[:, :, start:end])  # [BK, G, rows, end]
        do = d_out[:, :, start:end]
        dv = dv.at[:, :end].add(_product("bgqk,bgqd->bkd", p.astype(v.dtype), do))
        dp = _product("bgqd,bkd->bgqk", do, v[:, :end])
        ds = (p * (dp - delta[:, :, start:end]) * scale).astype(q.dtype)
        dq_blocks.append(_product("bgqk,bkd->bgqd", ds, k[:, :end]))
        dk = dk.at[:, :end].add(_product("bgqk,bgqd->bkd", ds, q[:, :, start:end]))
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_attention.defvjp(_forward, _backward)


def check_shapes(kernel: str, q, k, v, segment_ids) -> None:
    """The shapes every attention kernel takes: q [B,T,H,D], k/v [B,T,KVH,D] with H a multiple of KVH,
    segment_ids [B,T]; a ValueError naming `kernel` otherwise."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if k.shape != (b, t, kvh, d) or v.shape != k.shape:
        raise ValueError(f"{kernel} attention needs keys and values of shape {(b, t, kvh, d)}, got {k.shape} and "
                         f"{v.shape}")
    if h % kvh:
        raise ValueError(f"{kernel} attention needs query heads ({h}) that are a multiple of kv heads ({kvh})")
    if segment_ids.shape != (b, t):
        raise ValueError(f"{kernel} attention needs segment ids of shape {(b, t)}, got {segment_ids.shape}")


def causal_attention(q: jax.Array, keys: jax.Array, values: jax.Array, segment_ids: jax.Array, *,
                     block: int = 128) -> jax.Array:
    """softmax(q·kᵀ/√d + mask)·v for q [B,T,H,D], keys/values [B,T,KVH,D] (H a multiple of KVH), where
    query i sees key j when j <= i and segment_ids[b, j] == segment_ids[b, i] > 0 (segment_ids [B,T]
    int; 0 = padding). Padding queries see no key: their output is not meaningful."""
    b, t, h, d = q.shape
    kvh = keys.shape[2]
    if keys.shape[1] != t:
        raise ValueError(f"causal_attention needs as many keys as queries, got {keys.shape[1]} and {t}")
    if segment_ids.shape != (b, t):
        raise ValueError(f"causal_attention needs segment ids of shape {(b, t)}, got {segment_ids.shape}")
    kg = _group(keys, kvh)[:, 0]  # [B·KVH, T, D]
    vg = _group(values, kvh)[:, 0]
    return _ungroup(_causal_attention(_group(q, kvh), kg, vg, segment_ids.astype(jnp.int32), block), b)
