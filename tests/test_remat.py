"""Remat policies by name (config.REMAT_POLICIES): each saves what it says, and none changes a gradient."""
from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lima_jax.config import REMAT_POLICIES, REMAT_SAVED_NAMES, preset
from lima_jax.model import Llama

def _loss_and_params(policy: str):
    config = preset("tiny", dtype="float32", param_dtype="float32", remat_policy=policy, scan_layers=False)
    graphdef, params = nnx.split(Llama(config, seed=0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 24)), jnp.int32)
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
    positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4], jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, segment_ids=segments, positions=positions).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * (segments > 0))

    return loss, params


def _residuals(policy: str) -> list[str]:
    """What the backward pass keeps, one line per array (jax's own residual report)."""
    loss, params = _loss_and_params(policy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    return [line for line in out.getvalue().splitlines() if line.strip()]


def _saved_names(policy: str) -> set[str]:
    return {line.split("named '")[1].split("'")[0] for line in _residuals(policy) if "named '" in line}


def _activation_bytes(policy: str) -> int:
    """Bytes of the saved arrays that are not arguments (the parameters)."""
    total = 0
    for line in _residuals(policy):
        if "from the argument" in line:
            continue
        dtype_shape = line.split()[0]  # e.g. f32[2,24,64]
        dims = dtype_shape[dtype_shape.index("[") + 1:-1]
        total += 4 * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


@pytest.mark.parametrize("policy", sorted(REMAT_SAVED_NAMES))
def test_named_policies_save_exactly_their_activations(policy):
    assert _saved_names(policy) == set(REMAT_SAVED_NAMES[policy])


def test_full_remat_saves_no_named_activation_and_more_saved_means_more_memory():
    assert _saved_names("full") == set()
    assert _saved_names("offload_qkv_attn") == set()  # in host memory, not among the device's residuals
    kept = [_activation_bytes(p) for p in ("full", "qkv", "qkv_attn", "qkv_attn_mlp_in", "none")]
    assert kept[2] < _activation_bytes("qkv_attn_proj_gate_up") < kept[-1]
    assert kept == sorted(kept) and kept[0] < kept[1] and kept[-2] < kept[-1], kept


def test_every_policy_gives_the_same_gradients():
    loss, params = _loss_and_params("none")
    reference = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    for policy in REMAT_POLICIES:
        loss, params = _loss_and_params(policy)
        grads = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
        for a, b in zip(grads, reference):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="remat_policy='sometimes'"):
        preset("tiny", remat_policy="sometimes")
