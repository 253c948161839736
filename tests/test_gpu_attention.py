"""cuDNN attention (gpu_attention.py, attention_kernel="cudnn") without a GPU: the very call with jax's
XLA implementation equals attention.causal_attention at every real query (values and q/k/v gradients),
alone, sharded over a mesh and inside the model; rows are routed to cuDNN only when they are unpacked;
and the model's train step, lowered for CUDA, holds cuDNN's fused attention, forward and backward."""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lima_jax import gpu_attention, sharding, train_step
from lima_jax.attention import causal_attention
from lima_jax.config import ATTENTION_KERNELS, default_attention_kernel, preset
from lima_jax.device_mesh import device_mesh
from lima_jax.model import Llama
from lima_jax.optimizer import Recipe
from tests.attention_cases import inputs, run_on_four_cpu_devices, segments, value_and_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_call(q, k, v, ids):
    return gpu_attention.cudnn_causal_attention(q, k, v, ids, implementation="xla", block=32)


def test_prefix_lengths_says_which_batches_cudnn_takes():
    lengths, unpacked = gpu_attention.prefix_lengths(jnp.asarray(segments("right_pad")))
    assert lengths.tolist() == [96 - 45, 96 - 1] and bool(unpacked)
    assert bool(gpu_attention.prefix_lengths(jnp.asarray(segments("full")))[1])
    assert not bool(gpu_attention.prefix_lengths(jnp.asarray(segments("packed")))[1])
    assert not bool(gpu_attention.prefix_lengths(jnp.asarray(segments("left_pad")))[1])
    # One example whose id is not 1 is still one segment; an empty row counts as length 1 (all padding).
    ids = np.zeros((2, 8), np.int32)
    ids[0, :5] = 3
    lengths, unpacked = gpu_attention.prefix_lengths(jnp.asarray(ids))
    assert lengths.tolist() == [5, 1] and bool(unpacked)
    ids[0, 5] = 4  # a second example right after the first
    assert not bool(gpu_attention.prefix_lengths(jnp.asarray(ids))[1])


@pytest.mark.parametrize("kind", ["right_pad", "packed"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_same_call_with_xla_implementation_equals_causal_attention(kind, heads, kv_heads):
    """float32: the fused call (right-padded rows) and its fallback (packed rows) both equal XLA's
    blocked attention, values to 1e-5 and q/k/v gradients to 1e-4, for MHA, GQA and MQA."""
    ids = segments(kind)
    q, k, v, ids_j, weights = inputs(heads, kv_heads, ids)
    ref, ref_grads = jax.jit(lambda *a: value_and_grads(causal_attention, *a))(q, k, v, ids_j, weights)
    out, grads = jax.jit(lambda *a: value_and_grads(xla_call, *a))(q, k, v, ids_j, weights)
    real = ids > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0)


def test_unpacked_batches_run_the_fused_call_and_others_the_fallback(monkeypatch):
    """At run time: with jax's dot_product_attention replaced by zeros, an unpacked batch's output is
    zeros (it took the fused call, the one cuDNN runs on a GPU) and a packed or left-padded batch's is
    XLA's attention."""
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, **kwargs: jnp.zeros_like(q))
    for kind, fused in (("full", True), ("right_pad", True), ("packed", False), ("left_pad", False)):
        q, k, v, ids, _ = inputs(4, 2, segments(kind))
        out = np.asarray(jax.jit(xla_call)(q, k, v, ids))
        assert (not out.any()) == fused, kind


def test_bfloat16_call_is_as_close_to_float32_as_xla_attention():
    q, k, v, ids, weights = inputs(8, 2, segments("right_pad"), head_dim=32)
    real = segments("right_pad") > 0
    ref, _ = value_and_grads(causal_attention, q, k, v, ids, weights)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    errors = {}
    for name, attention in (("fused", xla_call), ("xla", causal_attention)):
        out = attention(*low, ids)
        assert out.dtype == jnp.bfloat16
        errors[name] = float(jnp.abs(out.astype(jnp.float32) - ref)[real].max())
    assert errors["fused"] <= 2 * errors["xla"] + 1e-3, errors


def test_cudnn_needs_a_supported_dtype_and_head_size():
    assert gpu_attention.cudnn_supports(jnp.bfloat16, 128) and gpu_attention.cudnn_supports(jnp.float16, 64)
    assert not gpu_attention.cudnn_supports(jnp.float32, 64)  # float32: the XLA attention, even on a GPU
    assert not gpu_attention.cudnn_supports(jnp.bfloat16, 20) and not gpu_attention.cudnn_supports(jnp.bfloat16, 256)
    q = jnp.zeros((1, 16, 4, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        gpu_attention.cudnn_causal_attention(q, jnp.zeros((1, 16, 3, 16)), jnp.zeros((1, 16, 3, 16)),
                                             jnp.ones((1, 16), int))
    with pytest.raises(ValueError, match="segment ids of shape"):
        gpu_attention.cudnn_causal_attention(q, jnp.zeros((1, 16, 2, 16)), jnp.zeros((1, 16, 2, 16)),
                                             jnp.ones((1, 8), int))
    with pytest.raises(ValueError, match="implementation='flash'"):
        gpu_attention.cudnn_causal_attention(q, q, q, jnp.ones((1, 16), int), implementation="flash")


def test_cudnn_is_the_kernel_on_gpus():
    assert "cudnn" in ATTENTION_KERNELS
    assert default_attention_kernel("gpu") == default_attention_kernel("cuda") == "cudnn"
    assert default_attention_kernel("tpu") == "splash" and default_attention_kernel("cpu") == "xla"


def test_model_logits_equal_with_the_cudnn_kernel_on_the_cpu():
    """The tiny model (float32) on right-padded and on packed rows: "cudnn" (off GPU: jax's XLA
    implementation of the same call) gives the "xla" kernel's logits at every real token."""
    for kind in ("right_pad", "packed"):
        ids = segments(kind)
        positions = np.zeros_like(ids)
        for row in range(len(ids)):
            for s in set(ids[row]) - {0}:
                positions[row, ids[row] == s] = np.arange((ids[row] == s).sum())
        tokens = jax.random.randint(jax.random.key(1), ids.shape, 0, 512)
        logits = {}
        for kernel in ("xla", "cudnn"):
            model = Llama(preset("tiny", dtype="float32", attention_kernel=kernel), seed=0)
            forward = nnx.jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p).logits)
            logits[kernel] = np.asarray(forward(model, tokens, jnp.asarray(ids), jnp.asarray(positions)))
        np.testing.assert_allclose(logits["cudnn"][ids > 0], logits["xla"][ids > 0], atol=1e-5, rtol=0)


_SHARDED = """
import numpy as np
from tests.attention_cases import assert_sharded_matches_xla, segments
from tests.test_gpu_attention import xla_call

# Rows 0-1 unpacked, 2-3 packed: fsdp=2 puts them on different devices, one taking the fused call and
# one its fallback.
assert_sharded_matches_xla(xla_call, np.concatenate([segments("right_pad"), segments("packed")]))
print("sharded ok")
"""


def test_sharded_over_a_mesh_matches_xla():
    """4 CPU devices: under a mesh the call runs per device through shard_map (rows over fsdp, heads
    over tensor) and still equals XLA's attention."""
    run_on_four_cpu_devices(_SHARDED, ROOT)


def _cuda_train_step_module(config) -> str:
    """The StableHLO of the tiny model's train step (one device) lowered for CUDA."""
    mesh = device_mesh(1, 1, 1, devices=jax.devices()[:1])
    r = Recipe(1, 4, 128, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    ts = train_step.build_train_step(config, r, mesh, sharding.DEFAULT_RULES, ("fsdp",), total_steps=1, rows=4)
    return ts.fn.trace(ts.abstract_state, ts.abstract_batch).lower(lowering_platforms=("cuda",)).as_text()


def test_train_step_lowered_for_cuda_holds_cudnn_flash_attention(monkeypatch):
    """With the platform reporting a GPU, the default kernel (attention_kernel=None) is cuDNN's: the
    train step lowered for CUDA on this CPU holds the fused attention forward and backward (one scanned
    layer body), and the blocked XLA attention as the packed rows' fallback. In float32 it has no
    fused attention (cuDNN does not take float32). Not compiled: that needs CUDA."""
    from jax._src.cudnn import fused_attention_stablehlo

    # What a GPU machine reports: the platform, and the cuDNN version jax asks the CUDA plugin for.
    monkeypatch.setattr(sharding, "platform", lambda: "gpu")
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    text = _cuda_train_step_module(preset("tiny", dtype="bfloat16"))
    calls = re.findall(r"__cudnn\$fmha\w+", text)
    assert sorted(set(calls)) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
    assert "stablehlo.case" in text or "stablehlo.if" in text  # the run-time choice of the fallback
    assert not re.findall(r"__cudnn\$fmha", _cuda_train_step_module(preset("tiny", dtype="float32")))
