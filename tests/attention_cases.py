"""Inputs shared by the attention kernels' tests (splash, cuDNN): segment-id layouts, random q/k/v with
weights on the real queries only, and values + gradients of a weighted sum."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def segments(kind: str, batch: int = 2, length: int = 96) -> np.ndarray:
    """[batch, length] segment ids (0 = padding): "full", "right_pad" (unpacked rows, as the padded LIMA
    step has them), "packed" (several examples per row, then padding; length >= 82) or "left_pad"
    (lm.logits of a left-padded batch)."""
    ids = np.ones((batch, length), np.int32)
    if kind == "right_pad":
        ids[0, -45:] = 0
        ids[1, -1:] = 0
    elif kind == "packed":
        ids[0] = np.repeat([1, 2, 3, 0], [30, 25, 20, length - 75])
        ids[1] = np.repeat([1, 2, 3, 4, 5], [7, 33, 1, 40, length - 81])
    elif kind == "left_pad":
        ids[0, :30] = 0
        ids[1, :1] = 0
    return ids


def inputs(heads, kv_heads, ids, head_dim=16):
    b, t = ids.shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, heads, head_dim))
    k = jax.random.normal(keys[1], (b, t, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (b, t, kv_heads, head_dim))
    # Only real queries count: padding's outputs are not meaningful (and differ between the kernels).
    weights = jax.random.normal(keys[3], q.shape) * (ids > 0)[:, :, None, None]
    return q, k, v, jnp.asarray(ids), weights


def value_and_grads(attention, q, k, v, ids, weights):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, ids).astype(jnp.float32) * weights)

    return attention(q, k, v, ids), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
