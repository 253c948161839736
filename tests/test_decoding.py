"""lima_jax/decoding.py: logits processors against transformers', greedy parity with transformers'
generate (with slot refills), sampling statistics, per-prompt determinism (order, neighbours, slots),
per-prompt budgets, per-row stopping, occupancy, no recompilation, the cache updated in place."""
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


def _toy_lm(vocab=40, seed=0, head_scale=8.0, **changes):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=96).replace(**changes)
    model = build_model(config, seed=seed)
    # Scale the head so the next-token distribution is neither flat nor one-hot.
    model.lm_head[...] = model.lm_head[...] * head_scale
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
def test_slot_greedy_equals_transformers_one_at_a_time(hf_model_dir, variant, penalty):
    """Six prompts of different lengths in 4 slots: two slots are refilled while the others decode."""
    hf, folder = hf_model_dir(seed=4, **variant)
    lm = lima_jax.load_pretrained(folder)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 256, n).tolist() for n in (3, 17, 40, 9, 60, 1)]
    n = 50
    gen = decoding.generate(lm, prompts, n, greedy=True, repetition_penalty=penalty, stop_ids=[], batch_size=4)
    assert gen.stats.finished == 6 and gen.stats.decode_steps == 2 * (n - 1)  # two waves of 4 + 2 prompts
    for prompt, got in zip(prompts, gen.tokens):
        assert got == _hf_greedy(hf, prompt, n, penalty)


@pytest.mark.parametrize("head_scale", [14.0, 1.0], ids=["mixed-draw-paths", "flat-rejection-draws"])
def test_a_prompt_samples_the_same_in_any_order_and_alone(head_scale):
    """Paper sampling, 12 prompts of mixed lengths and budgets with their own seeds in 4 slots: the
    reverse order (other slots, other neighbours, other start times) and a prompt alone give the
    same tokens. The flat model's nuclei exceed the 64 candidates (every draw by rejection); the
    other's are about half within them, so rows drawing by either path sit side by side."""
    lm = _toy_lm(vocab=300, head_scale=head_scale, max_position_embeddings=128)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 300, rng.randint(1, 70)).tolist() for _ in range(12)]
    budgets = rng.randint(1, 50, 12).tolist()
    seeds = (np.arange(12) * 7 + 3).tolist()
    forward = decoding.generate(lm, prompts, budgets, seed=seeds, batch_size=4, stop_ids=[])
    reverse = decoding.generate(lm, prompts[::-1], budgets[::-1], seed=seeds[::-1], batch_size=4, stop_ids=[])
    assert forward.tokens == reverse.tokens[::-1]
    assert [len(t) for t in forward.tokens] == budgets
    for i in (0, 7):
        assert lm.generate([prompts[i]], budgets[i], seed=[seeds[i]], batch_size=4, stop_ids=[]) == [forward.tokens[i]]
    # Not vacuous: another seed changes the tokens, and an int seed gives each prompt its own key.
    assert lm.generate([prompts[0]], budgets[0], seed=[seeds[0] + 1], stop_ids=[]) != [forward.tokens[0]]
    same = lm.generate([prompts[0]] * 2, 30, seed=seeds[0], stop_ids=[])
    assert same[0] != same[1]
    assert same[0] == lm.generate([prompts[0]], 30, seed=[seeds[0]], stop_ids=[])[0]  # prompt 0: fold 0


def test_each_prompt_gets_its_own_budget_and_occupancy_is_counted():
    """Without stops, prompt i gets exactly max_new_tokens[i]; a slot that finishes early idles when
    nothing is left to start, which the occupancy counts (one draw per prompt comes from its prefill)."""
    lm = _toy_lm()
    prompts = [[1, 2, 3], [1, 5], [1, 9, 9, 4], [2], [3, 3]]
    budgets = [10, 2, 7, 0, 1]
    gen = decoding.generate(lm, prompts, budgets, stop_ids=[], batch_size=2)
    assert [len(t) for t in gen.tokens] == budgets and gen.stopped == [False] * 5
    # Longest budget first: slot 0 runs 10, slot 1 runs 7, then 2 (then 1, done at its prefill draw).
    assert gen.stats.decode_steps == 9 and gen.stats.busy_slot_steps == 9 + 6 + 1 + 0
    assert gen.stats.occupancy == pytest.approx(16 / 18)
    # A budget of 10 for everyone: both slots busy at every step.
    full = decoding.generate(lm, prompts[:4], 10, stop_ids=[], batch_size=2)
    assert full.stats.occupancy == 1.0 and full.stats.new_tokens == 40


def test_per_row_stop_on_eot_and_nothing_after():
    lm = _toy_lm()
    prompts = [[1, 2, 3], [1, 5, 6, 7, 8], [1, 30]]
    free = lm.generate(prompts, max_new_tokens=24, greedy=True, stop_ids=[])
    eot = free[0][5]  # row 0 draws this at step 5 (and maybe earlier)
    lm_eot = LanguageModel(lm.config.replace(eot_token_id=eot), lm.model)
    # Default stops: EOT and EOS. Two slots: the third prompt starts in the slot a stop frees.
    stopped = lm_eot.generate(prompts, max_new_tokens=24, greedy=True, batch_size=2)
    for row_free, row in zip(free, stopped):
        cut = [i for i, t in enumerate(row_free) if t in (eot, lm.config.eos_token_id)]
        assert row == (row_free[:cut[0]] if cut else row_free)
    assert len(stopped[0]) <= 5
    gen = decoding.generate(lm_eot, prompts, 24, greedy=True)
    assert gen.stopped[0] and gen.tokens == stopped
    # One wave: the loop ends when the last row has made its draws (a stop token is a draw).
    assert gen.stats.decode_steps == max(len(t) + s for t, s in zip(gen.tokens, gen.stopped)) - 1
    assert all(s == (len(t) < 24) for s, t in zip(gen.stopped, gen.tokens))


def test_new_tokens_bounded_by_context():
    lm = _toy_lm()
    long_prompt = [1] + [5] * 92  # context 96: room for 3 new tokens
    gen = decoding.generate(lm, [long_prompt, [1, 2]], 10, stop_ids=[])
    assert [len(t) for t in gen.tokens] == [3, 10]
    assert gen.stopped == [False, False]
    with pytest.raises(ValueError, match="prompt 0 has 96 tokens"):
        lm.generate([[1] * 96])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        lm.generate([[1], []])
    with pytest.raises(ValueError, match="top_p"):
        lm.generate([[1]], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens has 1 values for 2 prompts"):
        lm.generate([[1], [2]], max_new_tokens=[3])
    with pytest.raises(ValueError, match="seed must be an int32"):
        lm.generate([[1]], seed=[1.5])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        lm.generate([[1]], batch_size=0)
    assert lm.generate([], 5) == []


def test_no_recompilation_after_warm_up():
    """Other prompts of the same prefill buckets, budgets and cache length run the compiled programs:
    slots, lengths, budgets and seeds are traced."""
    lm = _toy_lm()
    lm.generate([[1, 2, 3], [4] * 40, [5, 6]], [20, 9, 14], seed=1, batch_size=2, stop_ids=[])
    sizes = decoding._prefill_jit._cache_size(), decoding._decode_jit._cache_size()
    lm.generate([[7] * 45, [8, 9], [3] * 20, [2]], [3, 11, 25, 6], seed=[4, 5, 6, 7], batch_size=2, stop_ids=[])
    assert (decoding._prefill_jit._cache_size(), decoding._decode_jit._cache_size()) == sizes
    lm.generate([[1] * 50], 5, batch_size=2)  # a new prefill bucket: one more program (the test can fail)
    assert decoding._prefill_jit._cache_size() == sizes[0] + 1


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
    the size of a layer's cache buffer is a loop-carried buffer or an in-place slot write (one per slot:
    each writes at its own index). (Reading a layer out of stacked buffers copied it at every step on
    CPU; buffers that XLA could not update in place were copied whole.) Decoding runs the unrolled
    layer loop's per-layer buffers whatever the config's loop: built here with the scanned one."""
    lm = _toy_lm(scan_layers=True)
    cfg = lm.config
    slots, cache_len = 3, 64
    hlo = decoding.lower_decode_chunk(lm, slots, cache_len, 64).compile().as_text()
    computations = _computations(hlo)
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    # The token loop, not the sampler's: the one whose computations (with those it calls) hold the dots.
    loop = max(bodies, key=lambda name: sum(computations[c].count(" dot(") for c in _called(computations, name)))
    layer_elements = slots * cfg.num_kv_heads * cache_len * cfg.head_dim
    sized = []
    for shape, op, rest in re.findall(r"= \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)", computations[loop]):
        if _elements(shape) in (layer_elements, cfg.num_layers * layer_elements):
            sized.append(op)
            if op == "fusion":
                called = computations[re.search(r"calls=%?([\w.\-]+)", rest).group(1)]
                assert "dynamic-update-slice(" in called and "dynamic-slice(" not in called, called
            else:
                assert op in ("get-tuple-element", "bitcast", "parameter", "tuple"), op
    assert sized.count("fusion") == 2 * cfg.num_layers * slots  # each layer writes each slot's keys and values
    # Nor a copy of a layer's weights per token: they are sliced out of the stacked ones before the loop.
    e, f = cfg.hidden_size, cfg.intermediate_size
    weights = [op for shape, op in re.findall(r"= \w+\[([\d,]*)\]\S* ([\w-]+)\(", computations[loop])
               if shape in (f"{e},{f}", f"{f},{e}")]
    assert weights and set(weights) <= {"get-tuple-element", "parameter", "bitcast", "tuple"}, weights
    # The RoPE table depends on the cache length only: computed before the loop, not at every token.
    inside = _called(computations, loop)
    assert not any(" cosine(" in computations[name] or " sine(" in computations[name] for name in inside)


def test_prefill_writes_its_slot_in_place():
    """Starting a prompt writes its keys/values into the donated cache: in the compiled prefill (the
    program lima-aot lowers), every array the size of a layer's cache buffer is an input, an output or
    an in-place write; none is copied."""
    from lima_jax import mesh as mesh_lib

    config = _toy_lm().config
    slots, cache_len = 3, 64
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules, _ = mesh_lib.logical_rules()
    hlo = decoding.lower_prefill_slot(config, mesh, rules, slots, cache_len, 32).compile().as_text()
    computations = _computations(hlo)
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    layer_elements = slots * config.num_kv_heads * cache_len * config.head_dim
    sized = []
    for shape, op, rest in re.findall(r"= \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)", computations[entry]):
        if _elements(shape) == layer_elements:
            sized.append(op)
            if op == "fusion":
                called = computations[re.search(r"calls=%?([\w.\-]+)", rest).group(1)]
                assert "dynamic-update-slice(" in called, called
            else:
                assert op in ("get-tuple-element", "bitcast", "parameter", "tuple"), op
    assert sized.count("fusion") == 2 * config.num_layers  # each layer's keys and values, written once
