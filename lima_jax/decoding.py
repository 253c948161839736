"""Decoding: transformers-exact logits processing and the compiled KV-cache generation loop.

Sampling is a chain of small pure functions over (logits, tokens seen, settings), in the order
transformers applies them: repetition penalty → temperature → top-k → top-p, then a draw.

Two costs dominate on CPU and are avoided here (measured on a 2-core CPU, 58M LLaMA, batch 8: a
`jnp.sort` of 8 × 32,000 logits took ~80 ms, twice the 8 layers' dense part):
- a full-vocabulary sort per step for top-p: the nucleus cutoff is found among the top-K candidates
  when their mass reaches p (peaked distributions), otherwise by an exact bisection over the float
  order (flat distributions), both O(V) per pass;
- rescanning all previous tokens for the repetition penalty: a [B, V] "seen" mask is updated by one
  scatter per step.

The loop is a `lax.while_loop` whose carry holds the KV cache, so the cache is updated in place, and
which stops early once every row has finished. `start` (prefill + first token) and `decode_step` (one
token) are the one definition used by `LanguageModel.generate`, lima-decode, lima-chat and lima-aot.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lima_jax.model import LAYER_CACHE_NAMES, STACKED_CACHE_NAMES, KVCache, Llama

NUM_CANDIDATES = 64  # top-K candidates tried for top-p and for the draw before any full-vocabulary pass
# Trap: slicing lax.top_k's output (e.g. values[:, -1]) stops XLA:CPU from recognising it and turns it
# into a full sort (~25 ms at 8 x 32k); the smallest candidate is therefore taken with a min.
PROMPT_BUCKET = 32  # padded prompt lengths are multiples of this, so few shapes get compiled
_NEG_INF = -jnp.inf


# ---- logits processors (pure, jittable; [B, V] float32 in and out) -------------------------------
def seen_mask(previous_tokens: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: token v occurs in row b of previous_tokens [B, T]; -1 entries are padding."""
    tokens = jnp.asarray(previous_tokens, jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    columns = jnp.where(tokens < 0, vocab_size, tokens)  # out of range: dropped by the scatter
    return jnp.zeros((tokens.shape[0], vocab_size), bool).at[rows, columns].set(True, mode="drop")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL's penalty as transformers applies it: seen tokens' negative logits × p, positive ÷ p."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Removes logits below the k-th largest (ties with it are kept). top_k is static; 0 = off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jnp.min(jax.lax.top_k(logits, top_k)[0], axis=-1, keepdims=True)
    return jnp.where(logits < kth, _NEG_INF, logits)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values (-inf included; no NaNs expected)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _cutoff_by_candidates(values, lse, top_p):
    """(cutoff [B], exact [B]): the nucleus threshold computed from the top-K candidate values
    (descending), and whether it is exact, i.e. every token at or above it is a candidate."""
    probs = jnp.exp(values - lse[:, None])
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p).at[:, 0].set(True)  # at least one token
    count = jnp.sum(kept, axis=-1)
    cutoff = jnp.take_along_axis(values, (count - 1)[:, None], axis=-1)[:, 0]
    exact = (count < values.shape[-1]) & (jnp.min(values, axis=-1) < cutoff) & (top_p < 1.0)
    return cutoff, exact


def _cutoff_by_bisection(logits, lse, top_p):
    """The nucleus threshold by bisection over the float order of the logits (32 passes, exact).

    The kept set is {v : mass(logits > logit_v) < p}; its smallest member's key t satisfies
    mass(key > t) < p <= mass(key > t - 1). Invariant: mass(key > lo) >= p > mass(key > hi)."""
    keys = _order_keys(logits)
    probs = jnp.exp(logits - lse[:, None])

    def mass_above(t):
        return jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < top_p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.min(keys, axis=-1) - 1  # keys of finite values and -inf are >= 0x007FFFFF: no underflow
    hi = jnp.max(keys, axis=-1)
    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    # hi is the key of a token (see above); read its value back.
    return jnp.max(jnp.where(keys == hi[:, None], logits, _NEG_INF), axis=-1)


def _candidates(logits, top_p, num_candidates):
    """(candidate values, candidate ids, cutoff, exact): the top-K candidates and the top-p
    threshold computed from them, exact where they hold the whole nucleus."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    values, indices = jax.lax.top_k(logits, min(num_candidates, logits.shape[-1]))
    cutoff, exact = _cutoff_by_candidates(values, lse, jnp.asarray(top_p, jnp.float32))
    return values, indices, cutoff, exact


def top_p_filter(logits: jax.Array, top_p, num_candidates: int = NUM_CANDIDATES) -> jax.Array:
    """Keeps the smallest set of most probable tokens whose probability reaches top_p (at least
    one), as transformers' TopPLogitsWarper; tokens tied with the last kept one are kept too.
    top_p >= 1 keeps everything (transformers' generate skips the warper then). The threshold comes
    from the candidates when they hold the whole nucleus, else by bisection."""
    top_p = jnp.asarray(top_p, jnp.float32)
    _, _, cutoff, exact = _candidates(logits, top_p, num_candidates)

    def full():
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jax.lax.cond(top_p < 1.0, lambda: _cutoff_by_bisection(logits, lse, top_p),
                            lambda: jnp.full(logits.shape[:1], _NEG_INF))

    cutoff = jax.lax.cond(jnp.all(exact), lambda: cutoff, full)
    return jnp.where(logits < cutoff[:, None], _NEG_INF, logits)


def process_logits(logits: jax.Array, previous_tokens: jax.Array, temperature=0.7, top_p=0.9, top_k: int = 0,
                   repetition_penalty=1.2) -> jax.Array:
    """transformers' RepetitionPenalty → Temperature → TopK → TopP on logits [B, V] given the
    previous tokens [B, T] (prompt and output; -1 = padding). Removed entries are -inf."""
    logits = jnp.asarray(logits, jnp.float32)
    seen = seen_mask(previous_tokens, logits.shape[-1])
    return _warp(apply_repetition_penalty(logits, seen, repetition_penalty), temperature, top_p, top_k)


def _warp(logits, temperature, top_p, top_k: int):
    logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)


# ---- drawing a token --------------------------------------------------------------------------
def _inverse_cdf(u: jax.Array, logits: jax.Array) -> jax.Array:
    """Index drawn from softmax(logits) [B, N] with uniforms u [B] in [0, 1). -inf entries (zero
    probability) are never drawn: the first index whose running mass exceeds u·total has mass > 0."""
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    running = jnp.cumsum(probs, axis=-1)
    above = running > (u * running[:, -1])[:, None]
    return jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), jnp.argmax(probs, axis=-1))


def sample(key: jax.Array, logits: jax.Array, top_p=1.0, num_candidates: int = NUM_CANDIDATES) -> jax.Array:
    """A token id per row drawn from softmax(top_p_filter(logits, top_p)) [B, V]. When the nucleus
    lies among the top-K candidates (peaked distributions) the draw runs over those only; otherwise
    by rejection over the vocabulary, which needs no threshold."""
    u = jax.random.uniform(key, logits.shape[:1], jnp.float32)
    values, indices, cutoff, exact = _candidates(logits, top_p, num_candidates)

    def among_candidates():
        kept = jnp.where(values < cutoff[:, None], _NEG_INF, values)
        return jnp.take_along_axis(indices, _inverse_cdf(u, kept)[:, None], axis=-1)[:, 0]

    def over_vocabulary():
        return _nucleus_draw_by_rejection(key, u, logits, top_p)

    return jax.lax.cond(jnp.all(exact), among_candidates, over_vocabulary)


_DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF draw


def _draw_by_block_sums(u: jax.Array, probs: jax.Array) -> jax.Array:
    """`_inverse_cdf` for a whole vocabulary: the first index whose running mass exceeds u·total,
    found among block sums, then inside one block. XLA:CPU runs a cumsum over 32k entries as a chain
    of reduce-windows (~1.3 ms a step at batch 8); these two cumsums are over ~125 and 256 entries."""
    b, v = probs.shape
    blocks = -(-v // _DRAW_BLOCK)
    padded = jnp.pad(probs, ((0, 0), (0, blocks * _DRAW_BLOCK - v))).reshape(b, blocks, _DRAW_BLOCK)
    block_end = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)  # [B, blocks]
    target = u * block_end[:, -1]
    j = jnp.minimum(jnp.sum(block_end <= target[:, None], axis=-1), blocks - 1)  # first block past target
    before = jnp.where(j > 0, jnp.take_along_axis(block_end, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inside = jnp.take_along_axis(padded, j[:, None, None], axis=1)[:, 0]  # [B, block]
    above = before[:, None] + jnp.cumsum(inside, axis=-1) > target[:, None]
    # Rounding can leave no entry above target; the most probable token stands in (as in _inverse_cdf).
    return jnp.where(jnp.any(above, axis=-1), j * _DRAW_BLOCK + jnp.argmax(above, axis=-1), jnp.argmax(probs, axis=-1))


def _nucleus_draw_by_rejection(key, u, logits, top_p):
    """A draw from the nucleus of a flat distribution without finding its threshold: draw from the
    whole distribution and keep the token when it belongs to the nucleus (the tokens more probable
    than it hold less than top_p), else draw again. Accepted draws follow the renormalised nucleus
    exactly, and each attempt succeeds with probability >= top_p, so ~1.1 attempts of 2 passes over
    the vocabulary replace the 32 passes of `_cutoff_by_bisection`."""
    top_p = jnp.asarray(top_p, jnp.float32)
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    rows = jnp.arange(logits.shape[0])

    def attempt(state):
        i, token, done = state
        draw_u = jnp.where(i == 0, u, jax.random.uniform(jax.random.fold_in(key, i), u.shape, jnp.float32))
        drawn = _draw_by_block_sums(draw_u, probs)
        mass_more_probable = jnp.sum(jnp.where(logits > logits[rows, drawn][:, None], probs, 0.0), axis=-1)
        accept = ~done & ((mass_more_probable < top_p) | (top_p >= 1.0))
        return i + 1, jnp.where(accept, drawn, token), done | accept

    start = (jnp.zeros((), jnp.int32), jnp.zeros(logits.shape[:1], jnp.int32), jnp.zeros(logits.shape[:1], bool))
    return jax.lax.while_loop(lambda state: ~jnp.all(state[2]), attempt, start)[1]


class Settings(NamedTuple):
    """Traced sampling settings (changing them does not recompile)."""
    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    stop_ids: jax.Array  # [n] int32; -1 entries match nothing


def choose_tokens(logits, seen, key, settings: Settings, *, greedy: bool, top_k: int):
    """The next token per row: greedy = argmax after the repetition penalty (transformers applies
    no warpers without sampling), else a draw from the processed distribution."""
    logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_k_filter(logits / settings.temperature, top_k)
    return sample(key, logits, settings.top_p).astype(jnp.int32)


# ---- the generation loop ------------------------------------------------------------------------
class DecodeState(NamedTuple):
    cache: KVCache
    seen: jax.Array  # [B, V] bool: tokens in the prompt or output (repetition penalty)
    last: jax.Array  # [B] int32: the token drawn last, fed at the next step
    out: jax.Array  # [B, N] int32: drawn tokens, -1 where nothing was recorded
    lengths: jax.Array  # [B] int32: tokens recorded (stop tokens are not)
    step: jax.Array  # int32: draws made so far
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: finished on a stop id
    limit: jax.Array  # [B] int32: most new tokens for the row
    key: jax.Array


def _record(state: DecodeState, token, settings: Settings) -> DecodeState:
    """Stores the token of every unfinished row; a stop id finishes the row without being stored."""
    active = ~state.done
    is_stop = jnp.any(token[:, None] == settings.stop_ids[None, :], axis=-1)
    keep = active & ~is_stop
    column = jnp.where(keep, token, -1)
    out = jax.lax.dynamic_update_slice(state.out, column[:, None], (0, state.step))
    lengths = state.lengths + keep.astype(jnp.int32)
    stopped = state.stopped | (active & is_stop)
    done = state.done | is_stop | (lengths >= state.limit)
    rows = jnp.arange(token.shape[0])
    seen = state.seen.at[rows, token].set(True)
    return state._replace(seen=seen, last=token, out=out, lengths=lengths, step=state.step + 1, done=done,
                          stopped=stopped)


def _next_logits(model: Llama, tokens, mask, cache):
    out = model(tokens, mask, cache, last_logits_only=True)
    return out.logits[:, -1, : model.config.vocab_size], out.cache


def start(model: Llama, prompts, prompt_mask, limit, key, settings: Settings, *, max_new_tokens: int,
          greedy: bool, top_k: int) -> DecodeState:
    """Prefill of left-padded prompts [B, P] (prompt_mask 0 on padding) and the first draw."""
    cfg = model.config
    b, p = prompts.shape
    cache = KVCache.zeros(cfg, b, p + max_new_tokens)
    logits, cache = _next_logits(model, prompts, prompt_mask, cache)
    seen = seen_mask(jnp.where(prompt_mask, prompts, -1), cfg.vocab_size)
    state = DecodeState(cache=cache, seen=seen, last=jnp.zeros((b,), jnp.int32),
                        out=jnp.full((b, max_new_tokens), -1, jnp.int32), lengths=jnp.zeros((b,), jnp.int32),
                        step=jnp.zeros((), jnp.int32), done=limit <= 0, stopped=jnp.zeros((b,), bool),
                        limit=limit, key=key)
    token = choose_tokens(logits, seen, jax.random.fold_in(key, 0), settings, greedy=greedy, top_k=top_k)
    return _record(state, token, settings)


def decode_step(model: Llama, state: DecodeState, settings: Settings, *, greedy: bool, top_k: int) -> DecodeState:
    """Feeds each row's last token through the cache and draws the next one."""
    b = state.last.shape[0]
    logits, cache = _next_logits(model, state.last[:, None], jnp.ones((b, 1), bool), state.cache)
    state = state._replace(cache=cache)
    token = choose_tokens(logits, state.seen, jax.random.fold_in(state.key, state.step), settings,
                          greedy=greedy, top_k=top_k)
    return _record(state, token, settings)


def _generate(graphdef, params, prompts, prompt_mask, limit, key, settings, *, max_new_tokens, greedy, top_k):
    model = nnx.merge(graphdef, params)
    state = start(model, prompts, prompt_mask, limit, key, settings, max_new_tokens=max_new_tokens,
                  greedy=greedy, top_k=top_k)
    state = jax.lax.while_loop(
        lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
        lambda s: decode_step(model, s, settings, greedy=greedy, top_k=top_k), state)
    return state.out, state.lengths, state.stopped


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))


class Generation(NamedTuple):
    tokens: list  # per prompt: the new tokens, without the stop token
    stopped: list  # per prompt: True if it ended on a stop id, False if it hit the length limit


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], mask [B, P]) with each prompt at the right end; P a multiple of `bucket`."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // bucket) * bucket
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, prompt in enumerate(prompts):
        if len(prompt):
            tokens[i, width - len(prompt):] = prompt
            mask[i, width - len(prompt):] = True
    return tokens, mask


def default_stop_ids(config) -> list[int]:
    """EOT (when the model has one) and EOS."""
    return [i for i in (config.eot_token_id, config.eos_token_id) if i is not None]


def generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, greedy: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.2,
             seed: int = 0, stop_ids: Optional[Sequence[int]] = None) -> Generation:
    """Generates for a batch of token-id prompts of any lengths with a LanguageModel `lm` (its
    parameters stay where they are, e.g. sharded on lm.mesh); see LanguageModel.generate."""
    if not prompts:
        return Generation([], [])
    _check_settings(lm.config, prompts, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty)
    program, args, static = _generate_call(lm, prompts, max_new_tokens, greedy, temperature, top_p, top_k,
                                           repetition_penalty, seed, stop_ids)
    if max_new_tokens == 0:
        return Generation([[] for _ in prompts], [False] * len(prompts))
    with lm._rules():
        out, lengths, stopped = program(*args, **static)
    out, lengths, stopped = np.asarray(out), np.asarray(lengths), np.asarray(stopped)
    # Recorded tokens are contiguous from column 0: a row records every step until it finishes.
    return Generation([out[i, : lengths[i]].tolist() for i in range(len(prompts))], stopped.tolist())


def lower_generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, greedy: bool = False,
                   temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.2,
                   seed: int = 0, stop_ids: Optional[Sequence[int]] = None) -> jax.stages.Lowered:
    """The very program `generate` runs for these arguments, lowered, not run (`.compile().as_text()`
    shows what the decode loop compiles to)."""
    program, args, static = _generate_call(lm, prompts, max_new_tokens, greedy, temperature, top_p, top_k,
                                           repetition_penalty, seed, stop_ids)
    with lm._rules():
        return program.lower(*args, **static)


def _generate_call(lm, prompts, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                   stop_ids):
    """(the jitted generation program, its arguments, its static keywords)."""
    config = lm.config
    stop_ids = default_stop_ids(config) if stop_ids is None else [int(s) for s in stop_ids]
    context = config.max_position_embeddings
    limit = np.array([min(max_new_tokens, context - len(p)) for p in prompts], np.int32)
    # The loop bound (and cache length) depends on the settings only, not on the prompts, so batches
    # of one padded length share one compiled program; rows still stop at their own limit.
    steps = int(max(min(max_new_tokens, context - 1), 1))
    tokens, mask = left_pad(prompts)
    settings = Settings(jnp.float32(temperature), jnp.float32(top_p), jnp.float32(repetition_penalty),
                        jnp.asarray(stop_ids + [-1], jnp.int32))
    args = (lm._graphdef, lm._state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(limit),
            jax.random.key(seed), settings)
    static = dict(max_new_tokens=steps, greedy=bool(greedy), top_k=int(top_k))
    return _generate_jit, args, static


def _check_settings(config, prompts, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) >= config.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; the context holds "
                             f"{config.max_position_embeddings} (prompt plus at least one new token)")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {config.vocab_size}), got {low}..{high}")


# ---- the decode step on abstract inputs (lima-aot) ------------------------------------------------
def lower_decode_step(config, mesh, rules, batch_size: int, cache_len: int, *, greedy: bool = False,
                      top_k: int = 0):
    """`decode_step` — the body of `generate`'s loop — jitted with parameters and KV cache sharded on
    `mesh` by `rules`, lowered on abstract inputs (nothing allocated): what lima-aot compiles."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lima_jax import sharding

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config)))
    p_shard = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), p_shard)

    def spec(names, shape):
        return NamedSharding(mesh, sharding.logical_to_spec(names, rules, mesh, shape))

    def arg(shape, dtype, names=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec(names, shape) if names else
                                    NamedSharding(mesh, PartitionSpec()))

    b, v = batch_size, config.vocab_size
    kv = jax.eval_shape(lambda: KVCache.zeros(config, b, cache_len))  # the layout follows config.scan_layers
    kv_names = STACKED_CACHE_NAMES if config.scan_layers else LAYER_CACHE_NAMES
    buffers = partial(jax.tree.map, lambda a: arg(a.shape, a.dtype, kv_names))
    cache = KVCache(buffers(kv.k), buffers(kv.v), arg((b, cache_len), jnp.bool_, ("batch", "length")),
                    arg((), jnp.int32))
    state = DecodeState(cache=cache, seen=arg((b, v), jnp.bool_, ("batch", "vocab")), last=arg((b,), jnp.int32),
                        out=arg((b, cache_len), jnp.int32), lengths=arg((b,), jnp.int32), step=arg((), jnp.int32),
                        done=arg((b,), jnp.bool_), stopped=arg((b,), jnp.bool_), limit=arg((b,), jnp.int32),
                        key=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec())))
    settings = Settings(arg((), jnp.float32), arg((), jnp.float32), arg((), jnp.float32), arg((2,), jnp.int32))

    def step(params, state, settings):
        st = nnx.split(nnx.eval_shape(lambda: Llama(config)))[1]
        nnx.replace_by_pure_dict(st, params)
        with sharding.use_rules(mesh, rules):
            return decode_step(nnx.merge(graphdef, st), state, settings, greedy=greedy, top_k=top_k)

    return jax.jit(step, donate_argnums=1).lower(params, state, settings)
