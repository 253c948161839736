"""Blocked causal attention (attention.py): values and gradients equal dense softmax attention, and
the model with small blocks still matches transformers."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lima_jax
from lima_jax.attention import causal_attention, query_blocks
from lima_jax.language_model import LanguageModel, build_model
from tests.conftest import hf_logits


def dense_attention(q, k, v, mask):
    """The textbook formula with every score materialised: the reference."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(heads, kv_heads, length=40, batch=3):
    """q, k, v, segment ids, the dense mask they mean, and output weights (0 where a row sees no key)."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, 16))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, 16))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, 16))
    segments = np.ones((batch, length), np.int32)
    segments[0, -9:] = 0  # right padding
    segments[1, :5] = 0  # left padding: its first rows see no key at all
    segments[2] = [1] * 13 + [2] * 6 + [3] * 17 + [0] * 4  # a packed row: three examples, then padding
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & jnp.asarray(same)
    # Rows that see no key (padding) reach no other position: they get a uniform distribution over
    # different key ranges here and there, so they are left out.
    sees_a_key = jnp.any(mask, axis=-1)[:, :, None, None]
    return q, k, v, jnp.asarray(segments), mask, jnp.where(sees_a_key, jax.random.normal(keys[3], q.shape), 0.0)


def test_query_blocks_cover_the_sequence():
    assert query_blocks(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert query_blocks(8, 128) == [(0, 8)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [7, 16, 128])
def test_values_and_gradients_equal_dense_attention(heads, kv_heads, block):
    q, k, v, segments, mask, weight = _inputs(heads, kv_heads)
    out = causal_attention(q, k, v, segments, block=block)
    np.testing.assert_allclose(out * (weight != 0), dense_attention(q, k, v, mask) * (weight != 0), atol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)

    ours = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, segments, block=block)), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: dense_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def test_needs_as_many_keys_as_queries():
    q, k, v, segments, _, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match="as many keys as queries"):
        causal_attention(q, k[:, :-1], v[:, :-1], segments, block=8)


def test_model_with_several_blocks_matches_transformers(hf_model_dir):
    hf, folder = hf_model_dir(num_key_value_heads=2)
    lm = lima_jax.load_pretrained(folder)
    config = lm.config.replace(attention_block=8)  # 40 tokens: 5 query blocks
    blocked = LanguageModel(config, build_model(config, lm.params()))
    tokens = np.random.RandomState(1).randint(0, 256, (2, 40)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 31:] = 0
    ours, ref = blocked.logits(tokens, mask), hf_logits(hf, tokens, mask)
    assert np.abs(ours[0] - ref[0]).max() <= 1e-4
    assert np.abs(ours[1, :31] - ref[1, :31]).max() <= 1e-4


def test_attention_block_must_be_positive():
    from lima_jax.config import LlamaConfig

    with pytest.raises(ValueError, match="attention_block"):
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    attention_block=0)
