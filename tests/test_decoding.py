"""lima_jax/decoding.py: logits processors against transformers', greedy parity with transformers'
generate, sampling statistics, reproducibility and per-row stopping."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import lima_jax
from lima_jax import decoding
from lima_jax.config import LlamaConfig
from lima_jax.language_model import LanguageModel, build_model


def _hf_process(logits, previous, temperature, top_p, top_k, penalty):
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    ids = torch.tensor(previous, dtype=torch.long)
    scores = torch.tensor(logits)
    chain = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    chain.append(TopPLogitsWarper(top_p))
    for proc in chain:
        scores = proc(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_p,top_k,penalty,scale,vocab", [
    (0.7, 0.9, 0, 1.2, 1.0, 32000),  # the paper's settings, flat logits: nucleus of thousands (bisection)
    (0.7, 0.9, 0, 1.2, 6.0, 32000),  # the paper's settings, peaked logits: nucleus among the candidates
    (1.0, 0.5, 0, 1.0, 3.0, 1000),
    (1.3, 0.95, 50, 1.5, 2.0, 1000),  # top-k before top-p
    (0.5, 0.99, 200, 0.8, 1.0, 1000),  # penalty < 1 rewards repeats; top-k larger than the candidates
    (0.9, 0.05, 0, 1.2, 1.0, 1000),  # a tiny p keeps a single token
], ids=["paper-flat", "paper-peaked", "p0.5", "topk50", "topk200", "p0.05"])
def test_process_logits_matches_transformers(temperature, top_p, top_k, penalty, scale, vocab):
    rng = np.random.RandomState(0)
    logits = (rng.randn(4, vocab) * scale).astype(np.float32)
    previous = rng.randint(0, vocab, (4, 40))
    previous[1, :25] = -1  # padding, ignored by ours
    hf_previous = np.where(previous < 0, previous[:, -1:], previous)  # HF has no padding: repeat a seen id
    ours = np.asarray(decoding.process_logits(logits, previous, temperature, top_p, top_k, penalty))
    ref = _hf_process(logits, hf_previous, temperature, top_p, top_k, penalty)
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    assert np.all(ours[~kept] == -np.inf)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=1e-5)
    assert kept.sum(axis=1).min() >= 1


def test_nucleus_cutoff_paths_agree():
    """The candidate shortcut and the bisection give the same threshold wherever the shortcut is exact."""
    rng = np.random.RandomState(1)
    logits = jnp.asarray(rng.randn(16, 5000) * np.linspace(0.5, 8, 16)[:, None], jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    for p in (0.3, 0.9, 0.999):
        fast, exact = decoding._cutoff_by_candidates(jax.lax.top_k(logits, 64)[0], lse, p)
        slow = decoding._cutoff_by_bisection(logits, lse, p)
        exact = np.asarray(exact)
        assert exact.any() and not exact.all()  # both regimes occur in this batch
        np.testing.assert_array_equal(np.asarray(fast)[exact], np.asarray(slow)[exact])


def _chi_square_p(draws, probs, min_expected=5.0):
    """p-value of Pearson's chi-square test; categories with small expected counts are pooled."""
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    counts = np.bincount(draws, minlength=probs.size).astype(float)
    expected = probs * len(draws)
    assert counts[probs == 0].sum() == 0, "drew a removed token"
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("scale", [0.3, 2.0], ids=["full-vocabulary-draw", "candidate-draw"])
def test_sample_frequencies_match_probabilities(scale):
    logits = jnp.asarray(np.random.RandomState(2).randn(1, 300) * scale, jnp.float32)
    processed = decoding.top_p_filter(logits, 0.9)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: decoding.sample(k, logits, 0.9)[0]))(keys))
    probs = np.asarray(jax.nn.softmax(processed[0]))
    assert _chi_square_p(draws, probs) > 1e-3
    # The test has power: the same draws reject the distribution before top-p.
    assert _chi_square_p(draws, np.asarray(jax.nn.softmax(logits[0]))) < 1e-6


def _toy_lm(vocab=40, seed=0, **changes):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=96).replace(**changes)
    model = build_model(config, seed=seed)
    # Scale the head so the next-token distribution is neither flat nor one-hot.
    model.lm_head[...] = model.lm_head[...] * 8.0
    return LanguageModel(config, model)


def test_generated_token_frequencies_match_processed_probabilities():
    lm = _toy_lm()
    prompt = [1, 7, 3, 7, 12]
    n = 3000
    first = lm.generate([prompt] * n, max_new_tokens=1, seed=3, stop_ids=[])
    draws = np.array([t[0] for t in first])
    logits = lm.logits(np.array([prompt]))[:, -1]
    probs = np.asarray(jax.nn.softmax(decoding.process_logits(logits, np.array([prompt]))[0]))
    assert 3 <= (probs > 0).sum() < lm.config.vocab_size  # a non-trivial nucleus
    assert _chi_square_p(draws, probs) > 1e-3


def test_sampling_is_reproducible_for_a_seed():
    lm = _toy_lm()
    prompts = [[1, 2, 3], [1, 9, 9, 9, 4, 5], [1]]
    a = lm.generate(prompts, max_new_tokens=20, seed=5, stop_ids=[])
    b = lm.generate(prompts, max_new_tokens=20, seed=5, stop_ids=[])
    c = lm.generate(prompts, max_new_tokens=20, seed=6, stop_ids=[])
    assert a == b
    assert a != c
    assert [len(t) for t in a] == [20, 20, 20]


def _hf_greedy(hf, prompt, n, penalty):
    import torch

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=penalty,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant,penalty", [
    (dict(num_key_value_heads=2), 1.0),
    (dict(num_key_value_heads=1, tie_word_embeddings=True), 1.2),
], ids=["gqa", "tied"])
def test_batched_greedy_equals_transformers_one_at_a_time(hf_model_dir, variant, penalty):
    hf, folder = hf_model_dir(seed=4, **variant)
    lm = lima_jax.load_pretrained(folder)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 256, n).tolist() for n in (3, 17, 40, 9)]
    n = 50
    ours = lm.generate(prompts, max_new_tokens=n, greedy=True, repetition_penalty=penalty, stop_ids=[])
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(hf, prompt, n, penalty)


def test_per_row_stop_on_eot_and_nothing_after():
    lm = _toy_lm()
    prompts = [[1, 2, 3], [1, 5, 6, 7, 8], [1, 30]]
    free = lm.generate(prompts, max_new_tokens=24, greedy=True, stop_ids=[])
    eot = free[0][5]  # row 0 draws this at step 5 (and maybe earlier)
    lm_eot = LanguageModel(lm.config.replace(eot_token_id=eot), lm.model)
    stopped = lm_eot.generate(prompts, max_new_tokens=24, greedy=True)  # default: EOT and EOS
    for row_free, row in zip(free, stopped):
        cut = [i for i, t in enumerate(row_free) if t in (eot, lm.config.eos_token_id)]
        assert row == (row_free[:cut[0]] if cut else row_free)
    assert len(stopped[0]) <= 5
    gen = decoding.generate(lm_eot, prompts, 24, greedy=True)
    assert gen.stopped[0] and gen.tokens == stopped
    assert all(s == (len(t) < 24) for s, t in zip(gen.stopped, gen.tokens))


def test_new_tokens_bounded_by_context():
    lm = _toy_lm()
    long_prompt = [1] + [5] * 92  # context 96: room for 3 new tokens
    gen = decoding.generate(lm, [long_prompt, [1, 2]], 10, stop_ids=[])
    assert [len(t) for t in gen.tokens] == [3, 10]
    assert gen.stopped == [False, False]
    with pytest.raises(ValueError, match="prompt 0 has 96 tokens"):
        lm.generate([[1] * 96])
    with pytest.raises(ValueError, match="top_p"):
        lm.generate([[1]], top_p=0.0)


def test_block_sum_draw_equals_the_full_inverse_cdf():
    """The two-level draw used over the vocabulary picks the very index a full cumsum picks, and
    never a removed (-inf) token; 1000 entries are not a multiple of its block."""
    from lima_jax.decoding import _draw_by_block_sums, _inverse_cdf

    logits = jax.random.normal(jax.random.key(0), (4, 1000)) * 2
    logits = logits.at[:, 500:700].set(-jnp.inf)
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, -1, keepdims=True))
    us = jax.random.uniform(jax.random.key(1), (2000, 4))
    ours = jax.vmap(lambda u: _draw_by_block_sums(u, probs))(us)
    full = jax.vmap(lambda u: _inverse_cdf(u, logits))(us)
    np.testing.assert_array_equal(ours, full)
    assert not np.any((np.asarray(ours) >= 500) & (np.asarray(ours) < 700))


def _computations(hlo: str) -> dict:
    """{name: body text} of every computation in an HLO module's text."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\{\n(.*?)^\}", hlo, re.S | re.M)}


def _called(computations: dict, name: str) -> set:
    """`name` and every computation it calls, transitively (fusions, loops, branches)."""
    inside, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in inside:
            inside.add(current)
            todo += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", computations[current])
    return inside


def _elements(shape: str) -> int:
    return int(np.prod([int(n) for n in shape.split(",") if n])) if shape else 1


def test_decode_loop_writes_and_reads_the_kv_cache_in_place():
    """No copy of a layer's keys or values per generated token: inside the compiled loop, every array
    the size of a layer's cache buffer is a loop-carried buffer or an in-place slot write. (Reading a
    layer out of stacked buffers copied it at every step on CPU; buffers that XLA could not update in
    place were copied whole.) With the unrolled layer loop's per-layer buffers."""
    lm = _toy_lm(scan_layers=False)
    cfg = lm.config
    prompts = [[1, 2, 3], [4, 5], [6]]
    steps = 7
    hlo = decoding.lower_generate(lm, prompts, steps).compile().as_text()
    computations = _computations(hlo)
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    # The token loop, not the sampler's: the one whose computations (with those it calls) hold the dots.
    loop = max(bodies, key=lambda name: sum(computations[c].count(" dot(") for c in _called(computations, name)))
    layer_elements = 3 * cfg.num_kv_heads * (decoding.left_pad(prompts)[0].shape[1] + steps) * cfg.head_dim
    sized = []
    for shape, op, rest in re.findall(r"= \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)", computations[loop]):
        if _elements(shape) in (layer_elements, cfg.num_layers * layer_elements):
            sized.append(op)
            if op == "fusion":
                called = computations[re.search(r"calls=%?([\w.\-]+)", rest).group(1)]
                assert "dynamic-update-slice(" in called and "dynamic-slice(" not in called, called
            else:
                assert op in ("get-tuple-element", "bitcast", "parameter", "tuple"), op
    assert sized.count("fusion") == 2 * cfg.num_layers  # each layer writes its keys and values
    # The RoPE table depends on the cache length only: computed before the loop, not at every token.
    inside = _called(computations, loop)
    assert not any(" cosine(" in computations[name] or " sine(" in computations[name] for name in inside)
