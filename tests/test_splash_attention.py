"""The Pallas splash-attention kernel (splash_attention.py, attention_kernel="splash"): in interpret mode
on the CPU its values and gradients equal attention.causal_attention's at every real query, alone and
sharded over a mesh; the model gives the same logits with either kernel; the config field validates;
and for a TPU slice the compiled train step holds the Mosaic kernel."""
from __future__ import annotations

import importlib.util
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lima_jax import recipe as recipe_lib
from lima_jax.attention import causal_attention
from lima_jax.config import LlamaConfig, preset
from lima_jax.model import Llama
from lima_jax.splash_attention import block_size, splash_causal_attention
from tests.attention_cases import inputs, run_on_four_cpu_devices, segments, value_and_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the 'tpu' extra) is not installed: no TPU compiler to lower Mosaic")


def _assert_matches_xla(heads, kv_heads, layout):
    q, k, v, ids, weights = inputs(heads, kv_heads, layout)
    out, grads = value_and_grads(splash_causal_attention, q, k, v, ids, weights)
    ref, ref_grads = value_and_grads(causal_attention, q, k, v, ids, weights)
    real = layout > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=0, err_msg=f"d{name}")
    assert np.abs(np.asarray(ref_grads[0])).max() > 0.1  # the gradients compared are not all zero


@pytest.mark.parametrize("heads,kv_heads,kind", [
    (2, 2, "full"),  # MHA, one example per row
    (4, 2, "full"),  # GQA: the kernel's native grouped form
    (4, 1, "packed"),  # MQA, several examples per row
    (4, 2, "packed"),
    (4, 2, "left_pad"),
    (4, 2, "right_pad"),
])
def test_splash_matches_xla_attention(heads, kv_heads, kind):
    _assert_matches_xla(heads, kv_heads, segments(kind, 2, 128))


def test_splash_pads_lengths_to_its_blocks():
    """100 tokens: padded to the kernel's 128-row block with id-0 tokens, which no real query sees."""
    layout = segments("packed", 2, 128)[:, :100].copy()
    layout[0, 90:] = 0
    _assert_matches_xla(4, 2, layout)


def test_block_size():
    assert [block_size(t) for t in (128, 256, 384, 1024, 2048)] == [128, 256, 128, 512, 512]
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(100)


def test_splash_rejects_mismatched_shapes():
    q = jnp.zeros((1, 128, 4, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        splash_causal_attention(q, jnp.zeros((1, 128, 3, 16)), jnp.zeros((1, 128, 3, 16)), jnp.ones((1, 128), int))
    with pytest.raises(ValueError, match="segment ids of shape"):
        splash_causal_attention(q, jnp.zeros((1, 128, 2, 16)), jnp.zeros((1, 128, 2, 16)), jnp.ones((1, 64), int))


def test_model_logits_equal_with_either_kernel():
    """The tiny model on a packed batch: same logits at every real token with "splash" as with "xla"."""
    layout = segments("packed", 2, 128)
    positions = np.zeros_like(layout)
    for row in range(2):
        for s in set(layout[row]) - {0}:
            where = layout[row] == s
            positions[row, where] = np.arange(where.sum())
    tokens = jax.random.randint(jax.random.key(1), layout.shape, 0, 512)
    logits = {}
    for kernel in ("xla", "splash"):
        config = preset("tiny", dtype="float32", param_dtype="float32", attention_kernel=kernel)
        model = Llama(config, seed=0)
        forward = nnx.jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p).logits)
        logits[kernel] = np.asarray(forward(model, tokens, jnp.asarray(layout), jnp.asarray(positions)))
    real = layout > 0
    np.testing.assert_allclose(logits["splash"][real], logits["xla"][real], atol=1e-5, rtol=0)


def test_attention_kernel_config():
    with pytest.raises(ValueError, match=r"attention_kernel='flash'; expected one of \('xla', 'splash', 'cudnn'\)"):
        preset("tiny", attention_kernel="flash")
    # A lima_config.json written before the field existed still loads: None, by platform.
    old = {k: v for k, v in preset("tiny").to_dict().items() if k != "attention_kernel"}
    assert LlamaConfig.from_dict(old).attention_kernel is None
    assert LlamaConfig.from_dict(json.loads(json.dumps(preset("tiny", attention_kernel="splash").to_dict()))) \
        == preset("tiny", attention_kernel="splash")
    gin.clear_config()
    assert recipe_lib.model_config(preset="tiny", platform="tpu").attention_kernel == "splash"
    assert recipe_lib.model_config(preset="tiny", platform="cpu").attention_kernel == "xla"
    assert recipe_lib.model_config(preset="tiny", platform="gpu").attention_kernel == "cudnn"
    # The training field replaces the base's: a TPU-trained checkpoint's "splash" does not follow it to a CPU.
    base = preset("tiny", attention_kernel="splash")
    assert recipe_lib.model_config(base=base, platform="cpu").attention_kernel == "xla"
    try:
        gin.parse_config("model_config.attention_kernel = 'splash'")
        assert recipe_lib.model_config(preset="tiny", platform="cpu").attention_kernel == "splash"
    finally:
        gin.clear_config()


_SHARDED = """
from lima_jax.splash_attention import splash_causal_attention
from tests.attention_cases import assert_sharded_matches_xla, segments

layout = segments("packed", 4, 128)
layout[2:] = segments("left_pad", 2, 128)
assert_sharded_matches_xla(splash_causal_attention, layout)
print("sharded ok")
"""


def test_splash_sharded_over_a_mesh_matches_xla():
    """4 CPU devices, meshes fsdp=2 × tensor=2 and tensor=4: the kernel runs under shard_map, rows over
    fsdp and heads over tensor, and still equals XLA's attention."""
    run_on_four_cpu_devices(_SHARDED, ROOT)


@needs_libtpu
def test_splash_train_step_compiles_for_tpu():
    """The tiny model's train step (forward + backward) for v4-8 (8 devices, mesh fsdp=4 × tensor=2),
    compiled by libtpu: the attention is the Mosaic kernel, forward and both backward kernels."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    from lima_jax import mesh as mesh_lib, train_step
    from lima_jax.recipe import Recipe

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x1").devices
    assert len(devices) == 8
    mesh = mesh_lib.make_mesh(devices=devices, data=1, fsdp=4, tensor=2)
    rules, fsdp_axes = mesh_lib.logical_rules()
    r = Recipe(num_epochs=1, batch_size=8, max_len=256, learning_rate=1e-5, final_learning_rate=1e-6,
               warmup_steps=0, b1=0.9, b2=0.95, weight_decay=0.1, grad_accum_steps=1, seed=0)
    hlo = {}
    for kernel in ("splash", "xla"):
        config = preset("tiny", dtype="bfloat16", attention_kernel=kernel)
        ts = train_step.build_train_step(config, r, mesh, rules, fsdp_axes, total_steps=1, rows=8)
        hlo[kernel] = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile().as_text()
    # One scanned layer body: the forward kernel and the backward's dq and dkv kernels.
    assert hlo["splash"].count("tpu_custom_call") >= 3
    assert "tpu_custom_call" not in hlo["xla"]
