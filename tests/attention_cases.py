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


def assert_sharded_matches_xla(kernel, ids: np.ndarray) -> None:
    """On 4 devices: `kernel` runs under shard_map (rows over fsdp, heads over tensor) and equals XLA's
    attention at every real query, values and gradients. Meshes: kv heads split over tensor like the
    query heads; one kv head (MQA), kept whole; two kv heads for four devices, copied per query head
    (and the rows, 4 for fsdp=1, replicated)."""
    from lima_jax import sharding
    from lima_jax.attention import causal_attention
    from lima_jax.device_mesh import device_mesh

    for fsdp, tensor, heads, kv_heads in ((2, 2, 4, 2), (2, 2, 4, 1), (1, 4, 8, 2)):
        mesh = device_mesh(data=1, fsdp=fsdp, tensor=tensor)
        q, k, v, ids_j, weights = inputs(heads, kv_heads, ids)
        ref, ref_grads = value_and_grads(causal_attention, q, k, v, ids_j, weights)
        with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
            assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v, ids_j))
            out, grads = jax.jit(lambda *a: value_and_grads(kernel, *a))(q, k, v, ids_j, weights)
        real = ids > 0
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0)


def run_on_four_cpu_devices(script: str, root: str, timeout: int = 180) -> None:
    """Runs `script` in a subprocess with 4 CPU devices (the count is fixed at JAX import); it must
    print "sharded ok"."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and "sharded ok" in proc.stdout, proc.stderr[-3000:]
