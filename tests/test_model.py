"""lima_jax/model.py against transformers' LlamaForCausalLM (float32, random weights)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lima_jax
from lima_jax.language_model import build_model
from lima_jax.model import KVCache, Llama
from tests.conftest import hf_logits

TOL = 1e-4


def _tokens(batch, length, vocab=256, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("variant", [
    dict(num_key_value_heads=4),  # MHA
    dict(num_key_value_heads=2),  # GQA
    dict(num_key_value_heads=1),  # MQA, the GQA extreme
    dict(num_key_value_heads=2, tie_word_embeddings=True),
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
], ids=["mha", "gqa", "mqa", "tied", "linear_rope"])
def test_logits_match_transformers(hf_model_dir, variant):
    hf, folder = hf_model_dir(**variant)
    lm = lima_jax.load_pretrained(folder)
    tokens = _tokens(2, 24)
    ours, ref = lm.logits(tokens), hf_logits(hf, tokens)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_llama3_rope_scaling_beyond_original_context(hf_model_dir):
    # head_dim 16 with original context 64: frequencies fall in all three llama3 bands (kept,
    # blended, slowed); the sequence (100) is longer than the original context.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf, folder = hf_model_dir(rope_parameters=rope, max_position_embeddings=512, num_key_value_heads=2)
    lm = lima_jax.load_pretrained(folder)
    assert lm.config.rope_theta == 500000.0 and lm.config.rope_scaling["rope_type"] == "llama3"
    tokens = _tokens(1, 100, seed=1)
    assert np.abs(lm.logits(tokens) - hf_logits(hf, tokens)).max() <= TOL


def test_legacy_rope_config_fields(hf_model_dir):
    """Older config.json files carry top-level rope_theta / rope_scaling instead of rope_parameters."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf, folder = hf_model_dir(rope_parameters=rope, max_position_embeddings=512)
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    json.dump(cfg, open(path, "w"))
    lm = lima_jax.load_pretrained(folder)
    assert lm.config.rope_scaling["original_max_position_embeddings"] == 64
    tokens = _tokens(1, 90, seed=2)
    assert np.abs(lm.logits(tokens) - hf_logits(hf, tokens)).max() <= TOL


def test_right_padded_batch_ignores_padding(hf_model_dir):
    hf, folder = hf_model_dir(num_key_value_heads=2)
    lm = lima_jax.load_pretrained(folder)
    lengths = [20, 7, 13]
    tokens = _tokens(3, 20, seed=3)
    mask = np.arange(20)[None, :] < np.asarray(lengths)[:, None]
    padded = np.where(mask, tokens, 0)
    ours = lm.logits(padded, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = hf_logits(hf, tokens[row: row + 1, :n])[0]
        assert np.abs(ours[row, :n] - alone).max() <= TOL
    # and what transformers itself computes for the padded batch
    ref = hf_logits(hf, padded, attention_mask=mask.astype(np.int64))
    assert np.abs((ours - ref)[mask]).max() <= TOL


def _random_model(**overrides):
    config = lima_jax.preset("tiny", **overrides)
    return config, build_model(config, seed=3)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_scanned_and_unrolled_stacks_agree():
    config, scanned = _random_model(num_layers=3, residual_dropout=0.3)
    unrolled = build_model(config.replace(scan_layers=False), _params(scanned))
    tokens = jnp.asarray(_tokens(2, 16, vocab=config.vocab_size))
    key = jax.random.key(7)
    for dropout_key in (None, key):
        a = scanned(tokens, dropout_key=dropout_key).logits
        b = unrolled(tokens, dropout_key=dropout_key).logits
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    # dropout really changes the output when a key is given
    assert np.abs(np.asarray(scanned(tokens, dropout_key=key).logits - scanned(tokens).logits)).max() > 1e-3


def test_unrolled_layers_take_their_gradient_as_one_concatenation():
    """Per-layer trees equal the stacked slices, and the stack's gradient is concatenated from the
    layers' gradients, not summed from zero-padded copies of the whole stack (as indexing gave)."""
    from lima_jax.model import _unstack_layers

    stacked = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64)) / 8, jnp.float32),
               "s": jnp.ones((4, 64), jnp.float32)}
    layers = _unstack_layers(stacked, 4)
    assert all(np.array_equal(layers[i]["w"], stacked["w"][i]) for i in range(4))

    def loss(st):
        x = jnp.ones((8, 64))
        for layer in _unstack_layers(st, 4):
            x = jnp.tanh(x @ layer["w"] * layer["s"])
        return jnp.sum(x)

    hlo = jax.jit(jax.grad(loss)).lower(stacked).compile().as_text()
    assert " pad(" not in hlo and " concatenate(" in hlo


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_and_steps_equal_full_forward(scan_layers):
    config, model = _random_model(scan_layers=scan_layers, num_layers=2)
    lengths = [5, 11, 8]
    steps = 16
    full = _tokens(3, max(lengths) + steps, vocab=config.vocab_size, seed=4)
    t0 = max(lengths)
    # Left-pad each prompt to t0 so every row writes its next token into the same cache slot.
    prompt = np.zeros((3, t0), np.int32)
    prompt_mask = np.zeros((3, t0), bool)
    for row, n in enumerate(lengths):
        prompt[row, t0 - n:] = full[row, :n]
        prompt_mask[row, t0 - n:] = True
    cache = model.init_cache(batch=3, max_len=t0 + steps)
    forward = nnx.jit(lambda m, t, a, c: m(t, a, c))
    out = forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    incremental = [np.asarray(out.logits[:, -1])]
    cache = out.cache
    for step in range(steps - 1):
        next_tokens = np.asarray([[full[row, n + step]] for row, n in enumerate(lengths)], np.int32)
        out = forward(model, jnp.asarray(next_tokens), jnp.ones((3, 1), bool), cache)
        incremental.append(np.asarray(out.logits[:, 0]))
        cache = out.cache
    assert int(cache.index) == t0 + steps - 1
    for row, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(full[row: row + 1, : n + steps - 1])).logits[0])
        got = np.stack([incremental[s][row] for s in range(steps)])
        assert np.abs(got - alone[n - 1: n - 1 + steps]).max() <= 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_per_row_cache_index_and_logits_at_equal_full_forward(scan_layers):
    """Slot decoding's cache: each row's prompt right-padded at slots [0, n), its logits read at n - 1
    (logits_at), then one token per step written at the row's own index; a row that skips a step
    (attention mask 0) keeps its index. Every row's logits equal its full forward."""
    config, model = _random_model(scan_layers=scan_layers, num_layers=2)
    lengths = [5, 11, 8]
    steps = 6
    full = _tokens(3, max(lengths) + steps, vocab=config.vocab_size, seed=5)
    width = max(lengths)
    prompt = np.where(np.arange(width)[None] < np.array(lengths)[:, None], full[:, :width], 0).astype(np.int32)
    prompt_mask = np.arange(width)[None] < np.array(lengths)[:, None]
    forward = nnx.jit(lambda m, t, a, c, at: m(t, a, c, logits_at=at))
    cache = model.init_cache(batch=3, max_len=width + steps)
    out = forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache, jnp.asarray(lengths) - 1)
    got = [[np.asarray(out.logits[row, 0])] for row in range(3)]
    cache = out.cache._replace(index=jnp.asarray(lengths, jnp.int32), mask=jnp.asarray(
        np.arange(width + steps)[None] < np.array(lengths)[:, None]))
    step = nnx.jit(lambda m, t, a, c: m(t, a, c, last_logits_only=True))
    fed = list(lengths)
    for s in range(steps):
        active = np.array([True, s % 2 == 0, True])  # row 1 sits out every other step
        tokens = np.array([[full[row, fed[row]]] for row in range(3)], np.int32)
        out = step(model, jnp.asarray(tokens), jnp.asarray(active[:, None]), cache)
        cache = out.cache._replace(index=jnp.where(jnp.asarray(active), out.cache.index, cache.index))
        for row in np.flatnonzero(active):
            got[row].append(np.asarray(out.logits[row, 0]))
            fed[row] += 1
    assert list(np.asarray(cache.index)) == fed
    for row, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(full[row: row + 1, : fed[row]])).logits[0])
        assert np.abs(np.stack(got[row]) - alone[n - 1: fed[row]]).max() <= 1e-5


def test_layer_params_sliced_outside_equal_the_stacked_ones():
    """Decoding slices the layers' parameters once and passes them in: the same logits; the scanned
    loop refuses them (it slices inside its scan)."""
    config, model = _random_model(scan_layers=False, num_layers=2)
    tokens = jnp.asarray(_tokens(2, 9, vocab=config.vocab_size, seed=6))
    run = nnx.jit(lambda m, t: (m(t).logits, m(t, layer_params=m.split_layers()).logits))
    plain, sliced = run(model, tokens)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(sliced))
    _, scanned = _random_model(scan_layers=True, num_layers=2)
    with pytest.raises(ValueError, match="unrolled layer loop"):
        scanned(tokens, layer_params=scanned.split_layers())


def _layer_slice(model, index):
    graphdef, stacked = nnx.split(model.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], stacked))


@pytest.mark.parametrize("sublayer", ["mlp", "attn"])
def test_measured_dropout_fraction_follows_linear_schedule(sublayer):
    layers = 6
    config, model = _random_model(num_layers=layers, hidden_size=128, intermediate_size=256, num_heads=4,
                                  num_kv_heads=4, residual_dropout=0.3)
    # Silence the other sublayer so each layer's residual update is exactly the dropped-out sublayer output.
    silenced = model.layers.attn.o_proj if sublayer == "mlp" else model.layers.mlp.down_proj
    silenced[...] = jnp.zeros_like(silenced[...])
    tokens = jnp.asarray(_tokens(4, 128, vocab=config.vocab_size, seed=5))
    hidden = np.asarray(model(tokens, dropout_key=jax.random.key(0), return_hidden_states=True).hidden_states)
    expected = config.layer_dropout_rates()
    assert expected[0] == 0.0 and expected[-1] == pytest.approx(0.3)
    for l in range(layers):
        update = hidden[l + 1] - hidden[l]
        dropped = float(np.mean(update == 0.0))
        assert dropped == pytest.approx(0.3 * l / (layers - 1), abs=0.01), (l, dropped)
        if sublayer == "mlp":  # kept entries are rescaled by 1 / (1 - rate)
            layer = _layer_slice(model, l)
            clean = np.asarray(layer.mlp(layer.post_attn_norm(jnp.asarray(hidden[l]))))
            kept = update != 0
            np.testing.assert_allclose(update[kept], clean[kept] / (1 - expected[l]), rtol=1e-4, atol=1e-5)


def test_deterministic_mode_equals_no_dropout(hf_model_dir):
    hf, folder = hf_model_dir()
    lm = lima_jax.load_pretrained(folder)
    with_dropout = build_model(lm.config.replace(residual_dropout=0.3), lm.params())
    without = build_model(lm.config, lm.params())
    tokens = _tokens(2, 12)
    ours = np.asarray(with_dropout(jnp.asarray(tokens), dropout_key=None).logits)
    # Both run op by op: against lm.logits (one compiled program) they differ by an ulp on an
    # AVX-512 Xeon, where XLA fuses (and contracts into FMAs) differently than op by op.
    assert np.array_equal(ours, np.asarray(without(jnp.asarray(tokens), dropout_key=None).logits))
    np.testing.assert_allclose(ours, lm.logits(tokens), rtol=0, atol=1e-6)
    assert np.abs(ours - hf_logits(hf, tokens)).max() <= TOL


@pytest.mark.parametrize("max_shard_size", [None, "40KB"], ids=["single_file", "sharded"])
def test_load_pretrained_reads_save_pretrained_folders(hf_model_dir, max_shard_size):
    hf, folder = hf_model_dir(num_key_value_heads=2, max_shard_size=max_shard_size)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if max_shard_size is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) >= 3 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    lm = lima_jax.load_pretrained(folder)
    tokens = _tokens(2, 16, seed=6)
    assert np.abs(lm.logits(tokens) - hf_logits(hf, tokens)).max() <= TOL


def test_bfloat16_close_to_float32(hf_model_dir):
    _, folder = hf_model_dir(num_key_value_heads=2)
    f32 = lima_jax.load_pretrained(folder, dtype="float32")
    bf16 = lima_jax.load_pretrained(folder, dtype="bfloat16")
    assert bf16.model.embed[...].dtype == jnp.bfloat16
    tokens = _tokens(2, 32, seed=8)
    a, b = f32.logits(tokens), bf16.logits(tokens)
    assert b.dtype == np.float32
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert rel <= 2e-2, rel


def test_bad_token_ids_and_dtype_are_clear_errors(hf_model_dir):
    _, folder = hf_model_dir()
    with pytest.raises(ValueError, match="dtype"):
        lima_jax.load_pretrained(folder, dtype="float16")
    lm = lima_jax.load_pretrained(folder)
    with pytest.raises(ValueError, match="token ids"):
        lm.logits(np.asarray([[1, 9999]]))


def test_padded_vocabulary_rows_never_win():
    config, model = _random_model(vocab_size=500, vocab_padding_multiple=128)
    assert model.embed[...].shape[0] == 512
    logits = np.asarray(model(jnp.asarray(_tokens(1, 8, vocab=500))).logits)
    assert (logits[..., 500:] <= np.finfo(np.float32).min / 2).all()
    assert logits[..., :500].argmax(-1).max() < 500


def test_rope_cos_and_sin_are_computed_once_per_step():
    """The cos/sin table is computed once, not fused into every layer's RoPE, forward and backward,
    where XLA evaluated it again for every element and head."""
    config, model = _random_model(scan_layers=False, num_layers=3)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(_tokens(2, 16, vocab=config.vocab_size))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(tokens).logits)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1


def test_cache_zeros_shapes():
    config = lima_jax.preset("tiny").replace(scan_layers=True)
    cache = KVCache.zeros(config, batch=2, max_len=10)
    assert cache.k.shape == (config.num_layers, 2, 10, config.num_kv_heads, config.head_dim) and not cache.per_layer
    assert not bool(cache.mask.any()) and int(cache.index) == 0
    # The unrolled loop's cache: a buffer per layer, heads first.
    per_layer = KVCache.zeros(config.replace(scan_layers=False), batch=2, max_len=10)
    assert per_layer.per_layer and len(per_layer.k) == len(per_layer.v) == config.num_layers
    assert {a.shape for a in per_layer.k + per_layer.v} == {(2, config.num_kv_heads, 10, config.head_dim)}


def test_cache_layout_must_match_the_layer_loop():
    config, model = _random_model(scan_layers=True, num_layers=2)
    tokens = jnp.asarray(_tokens(1, 4, vocab=config.vocab_size))
    with pytest.raises(ValueError, match="stacked KV cache"):
        model(tokens, cache=KVCache.zeros(config.replace(scan_layers=False), 1, 8))
    config, model = _random_model(scan_layers=False, num_layers=2)
    with pytest.raises(ValueError, match="per-layer KV cache"):
        model(tokens, cache=KVCache.zeros(config.replace(scan_layers=True), 1, 8))


def test_model_is_nnx_module_with_logical_names():
    model = Llama(lima_jax.preset("tiny"))
    from lima_jax.model import param_logical_names
    names = param_logical_names(model)
    assert names[("layers", "attn", "q_proj")] == ("layers", "embed", "heads", "head_dim")
    assert names[("layers", "attn", "k_proj")] == ("layers", "embed", "kv_heads", "head_dim")
    assert names[("layers", "mlp", "down_proj")] == ("layers", "mlp", "embed")
    assert names[("embed",)] == ("vocab", "embed") and names[("lm_head",)] == ("embed", "vocab")
    assert all(n is not None for n in names.values())
