"""Decoding: transformers-exact logits processing and the slot-based KV-cache decoder.

Sampling is a chain of small pure functions over (logits, tokens seen, settings), in the order
transformers applies them: repetition penalty → temperature → top-k → top-p, then a draw.

Two costs dominate on CPU and are avoided here (measured on a 2-core CPU, 58M LLaMA, batch 8: a
`jnp.sort` of 8 × 32,000 logits took ~80 ms, twice the 8 layers' dense part):
- a full-vocabulary sort per step for top-p: the nucleus cutoff is found among the top-K candidates
  when their mass reaches p (peaked distributions), otherwise by an exact bisection over the float
  order (flat distributions), both O(V) per pass;
- rescanning all previous tokens for the repetition penalty: a [B, V] "seen" mask is updated by one
  scatter per step.

Slot decoding (continuous batching): `batch_size` slots, each holding one prompt at its own cache
length and position. A host loop alternates two compiled programs, both taking the slot state donated
so the cache is updated in place: `prefill_slot` writes one prompt (right-padded to a bucket) into a
free slot and draws its first token; `decode_chunk` runs `decode_step` (one token for every slot, each
written at the slot's own index) until some slot finishes or CHUNK_STEPS pass. The host then hands
the finished slots the next prompts. Slots, lengths, budgets and seeds are traced: no recompilation
after the first call of each shape (prefill bucket; slots × cache length × output width).

Per-prompt determinism: a prompt's k-th draw uses fold_in(its own key, k), the draw's path (among
the candidates or by rejection) is chosen per row, and a prompt's prefill shape depends on its length
only; so its tokens depend on its prompt, settings and seed, not on its slot, neighbours or start
time. (A call's cache length follows its longest prompt + budget; masked cache slots add exact zeros
to attention, and a prompt decoded alone matches it inside a batch: tests/test_decoding.py.)
`prefill_slot` and `decode_step` are the one definition used by `LanguageModel.generate`,
lima-decode, lima-chat and lima-aot.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lima_jax.model import LAYER_CACHE_NAMES, KVCache, Llama

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


def _uniforms(key: jax.Array, rows: int, attempt=None) -> jax.Array:
    """[rows] uniforms in [0, 1): from one key for the whole batch (key shape ()), or one per row from
    each row's own key (shape [rows]), so that a row's draws do not depend on the other rows."""
    if key.ndim == 0:
        return jax.random.uniform(key if attempt is None else jax.random.fold_in(key, attempt), (rows,), jnp.float32)
    fold = (lambda k: k) if attempt is None else (lambda k: jax.random.fold_in(k, attempt))
    return jax.vmap(lambda k: jax.random.uniform(fold(k), (), jnp.float32))(key)


def sample(key: jax.Array, logits: jax.Array, top_p=1.0, num_candidates: int = NUM_CANDIDATES) -> jax.Array:
    """A token id per row drawn from softmax(top_p_filter(logits, top_p)) [B, V]; `key` is one key,
    or one per row [B]. Where a row's nucleus lies among the top-K candidates (peaked distributions)
    its draw runs over those only; otherwise by rejection over the vocabulary, which needs no
    threshold. The path is chosen per row, so a row's token does not depend on its neighbours."""
    u = _uniforms(key, logits.shape[0])
    values, indices, cutoff, exact = _candidates(logits, top_p, num_candidates)
    kept = jnp.where(values < cutoff[:, None], _NEG_INF, values)
    among_candidates = jnp.take_along_axis(indices, _inverse_cdf(u, kept)[:, None], axis=-1)[:, 0]

    def over_vocabulary():
        return jnp.where(exact, among_candidates, _nucleus_draw_by_rejection(key, u, logits, top_p, skip=exact))

    return jax.lax.cond(jnp.all(exact), lambda: among_candidates, over_vocabulary)


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


def _nucleus_draw_by_rejection(key, u, logits, top_p, skip=None):
    """A draw from the nucleus of a flat distribution without finding its threshold: draw from the
    whole distribution and keep the token when it belongs to the nucleus (the tokens more probable
    than it hold less than top_p), else draw again. Accepted draws follow the renormalised nucleus
    exactly, and each attempt succeeds with probability >= top_p, so ~1.1 attempts of 2 passes over
    the vocabulary replace the 32 passes of `_cutoff_by_bisection`. Rows in `skip` [B] are not drawn
    (their result is meaningless)."""
    top_p = jnp.asarray(top_p, jnp.float32)
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    rows = jnp.arange(logits.shape[0])

    def attempt(state):
        i, token, done = state
        draw_u = jnp.where(i == 0, u, _uniforms(key, u.shape[0], i))
        drawn = _draw_by_block_sums(draw_u, probs)
        mass_more_probable = jnp.sum(jnp.where(logits > logits[rows, drawn][:, None], probs, 0.0), axis=-1)
        accept = ~done & ((mass_more_probable < top_p) | (top_p >= 1.0))
        return i + 1, jnp.where(accept, drawn, token), done | accept

    done = jnp.zeros(logits.shape[:1], bool) if skip is None else skip
    start = (jnp.zeros((), jnp.int32), jnp.zeros(logits.shape[:1], jnp.int32), done)
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


# ---- slot decoding: the state of `batch_size` slots, each decoding its own prompt -----------------
CACHE_BUCKET = 64  # cache lengths and output widths are multiples of this, so few shapes get compiled
CHUNK_STEPS = 32  # most decode steps between two host syncs (a chunk also ends when a prompt finishes)


class DecodeState(NamedTuple):
    """Every slot's decoding state; row b is slot b. A slot holds one prompt at a time: its prompt
    fills cache slots [0, length) (right-padded), each fed token the next one, at the row's own index."""
    cache: KVCache  # index [B]: each slot's next cache slot
    seen: jax.Array  # [B, V] bool: tokens in the prompt or output (repetition penalty)
    last: jax.Array  # [B] int32: the token drawn last, fed at the next step
    out: jax.Array  # [B, N] int32: drawn tokens, -1 where nothing was recorded
    lengths: jax.Array  # [B] int32: tokens recorded (stop tokens are not)
    step: jax.Array  # [B] int32: draws made for the slot's prompt; the next draw's index
    done: jax.Array  # [B] bool: finished (or empty)
    stopped: jax.Array  # [B] bool: finished on a stop id
    limit: jax.Array  # [B] int32: most new tokens for the slot's prompt
    keys: jax.Array  # [B, 2] uint32: the key data of the slot's prompt key


def _draw_keys(state: DecodeState) -> jax.Array:
    """[B] keys of the next draw: fold_in(prompt key, draw index), so a prompt's draws depend on its
    key and the token's index only, not on the slot, its neighbours or when it was started."""
    keys = jax.random.wrap_key_data(state.keys)
    return jax.vmap(jax.random.fold_in)(keys, state.step)


def _record(state: DecodeState, token, settings: Settings) -> DecodeState:
    """Stores the token of every unfinished row; a stop id finishes the row without being stored."""
    active = ~state.done
    is_stop = jnp.any(token[:, None] == settings.stop_ids[None, :], axis=-1)
    keep = active & ~is_stop
    rows = jnp.arange(token.shape[0])
    width = state.out.shape[1]
    out = state.out.at[rows, jnp.where(keep, state.lengths, width)].set(token, mode="drop")
    lengths = state.lengths + keep.astype(jnp.int32)
    stopped = state.stopped | (active & is_stop)
    done = state.done | is_stop | (lengths >= state.limit)
    seen = state.seen.at[rows, token].set(True)
    return state._replace(seen=seen, last=token, out=out, lengths=lengths, step=state.step + active.astype(jnp.int32),
                          done=done, stopped=stopped)


def empty_state(config, batch_size: int, cache_len: int, max_new_tokens: int) -> DecodeState:
    """`batch_size` empty (done) slots with a per-row-index cache of cache_len slots."""
    b = batch_size
    cache = KVCache.zeros(config, b, cache_len)
    cache = cache._replace(index=jnp.zeros((b,), jnp.int32))
    zeros = jnp.zeros((b,), jnp.int32)
    return DecodeState(cache=cache, seen=jnp.zeros((b, config.vocab_size), bool), last=zeros,
                       out=jnp.full((b, max_new_tokens), -1, jnp.int32), lengths=zeros, step=zeros,
                       done=jnp.ones((b,), bool), stopped=jnp.zeros((b,), bool), limit=zeros,
                       keys=jnp.zeros((b, 2), jnp.uint32))


def prompt_key(seed, fold) -> jax.Array:
    """A prompt's key: fold_in(key(seed), fold) (jittable)."""
    return jax.random.fold_in(jax.random.key(seed), fold)


def _insert_row(cache: KVCache, row: KVCache, slot, length) -> KVCache:
    """The cache with slot `slot` holding a one-row cache's keys/values (its first min(P, S) slots),
    its first `length` slots marked real and its index at `length`."""
    s, p = cache.mask.shape[1], row.mask.shape[1]
    n = min(s, p)  # slots past the prompt are padding; past S there is nothing real (length <= S)
    if cache.per_layer:  # [B,KVH,S,D]
        put = lambda big, small: jax.lax.dynamic_update_slice(big, small[:, :, :n], (slot, 0, 0, 0))
        k = tuple(map(put, cache.k, row.k))
        v = tuple(map(put, cache.v, row.v))
    else:  # [L,B,S,KVH,D]
        k = jax.lax.dynamic_update_slice(cache.k, row.k[:, :, :n], (0, slot, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(cache.v, row.v[:, :, :n], (0, slot, 0, 0, 0))
    mask = jax.lax.dynamic_update_slice(cache.mask, (jnp.arange(s) < length)[None], (slot, 0))
    return KVCache(k, v, mask, cache.index.at[slot].set(length))


def prefill_slot(model: Llama, state: DecodeState, slot, tokens, length, limit, seed, fold, settings: Settings, *,
                 greedy: bool, top_k: int, layers: Optional[list] = None) -> DecodeState:
    """Starts a prompt in slot `slot`: tokens [1, P] (the prompt right-padded to a bucket, `length`
    real), its keys/values written into the slot, its first token drawn (draw 0 of its key
    prompt_key(seed, fold)); at most `limit` new tokens. layers: model.split_layers(), or None."""
    cfg = model.config
    p = tokens.shape[1]
    prompt_mask = (jnp.arange(p) < length)[None]
    out = model(tokens, prompt_mask, KVCache.zeros(cfg, 1, p), logits_at=(length - 1)[None], layer_params=layers)
    logits = out.logits[:, 0, : cfg.vocab_size]
    limit = jnp.asarray(limit, jnp.int32)[None]
    zero = jnp.zeros((1,), jnp.int32)
    row = DecodeState(cache=None, seen=seen_mask(jnp.where(prompt_mask, tokens, -1), cfg.vocab_size), last=zero,
                      out=jnp.full((1, state.out.shape[1]), -1, jnp.int32), lengths=zero, step=zero, done=limit <= 0,
                      stopped=jnp.zeros((1,), bool), limit=limit,
                      keys=jax.random.key_data(prompt_key(seed, fold))[None])
    token = choose_tokens(logits, row.seen, _draw_keys(row), settings, greedy=greedy, top_k=top_k)
    row = _record(row, token, settings)
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis=0)
    fields = {f: put(getattr(state, f), getattr(row, f)) for f in DecodeState._fields if f != "cache"}
    return DecodeState(cache=_insert_row(state.cache, out.cache, slot, length), **fields)


def _next_logits(model: Llama, tokens, mask, cache, layers=None):
    out = model(tokens, mask, cache, last_logits_only=True, layer_params=layers)
    return out.logits[:, -1, : model.config.vocab_size], out.cache


def decode_step(model: Llama, state: DecodeState, settings: Settings, *, greedy: bool, top_k: int,
                layers: Optional[list] = None) -> DecodeState:
    """Feeds each slot's last token through the cache at the slot's own index and draws the next one.
    Finished and empty slots run too (static shapes) but keep their index and record nothing.
    layers: model.split_layers() (the unrolled loop's), taken outside the token loop, or None."""
    active = ~state.done
    logits, cache = _next_logits(model, state.last[:, None], active[:, None], state.cache, layers)
    cache = cache._replace(index=jnp.where(active, cache.index, state.cache.index))
    token = choose_tokens(logits, state.seen, _draw_keys(state), settings, greedy=greedy, top_k=top_k)
    return _record(state._replace(cache=cache), token, settings)


def decode_chunk(model: Llama, state: DecodeState, settings: Settings, max_steps, *, greedy: bool, top_k: int,
                 layers: Optional[list] = None):
    """(state, steps run, busy slot-steps): decode steps until max_steps, every slot is done, or some
    slot finishes (so that the host can give it the next prompt). The unrolled loop's layer parameters
    (`layers`, else sliced here) are taken out of the stacked ones before the token loop."""
    started_done = state.done
    if layers is None and not model.config.scan_layers:
        layers = model.split_layers()

    def running(carry):
        i, _, s = carry
        return (i < max_steps) & ~jnp.all(s.done) & ~jnp.any(s.done & ~started_done)

    def step(carry):
        i, busy, s = carry
        busy = busy + jnp.sum(~s.done, dtype=jnp.int32)
        return i + 1, busy, decode_step(model, s, settings, greedy=greedy, top_k=top_k, layers=layers)

    zero = jnp.zeros((), jnp.int32)
    steps, busy, state = jax.lax.while_loop(running, step, (zero, zero, state))
    return state, steps, busy


def _split_layers(graphdef, params):
    return nnx.merge(graphdef, params).split_layers()


def _prefill(graphdef, params, layers, state, slot, tokens, length, limit, seed, fold, settings, *, greedy, top_k):
    return prefill_slot(nnx.merge(graphdef, params), state, slot, tokens, length, limit, seed, fold, settings,
                        greedy=greedy, top_k=top_k, layers=layers)


def _decode(graphdef, params, layers, state, settings, max_steps, *, greedy, top_k):
    return decode_chunk(nnx.merge(graphdef, params), state, settings, max_steps, greedy=greedy, top_k=top_k,
                        layers=layers)


def decode_config(config):
    """The model config decoding runs: the unrolled layer loop, whose per-layer cache buffers are written
    and read in place (the stacked cache of the scanned loop is copied a layer at a time at every
    token, a cost that grows with the cache: 1.8x the step time at 1024 slots, 58M model, CPU). The
    parameters are the same arrays in either loop."""
    return config.replace(scan_layers=False)


@functools.lru_cache(maxsize=None)
def decode_graphdef(config) -> nnx.GraphDef:
    """The graph of `decode_config(config)`'s model, to merge with a LanguageModel's parameters."""
    return nnx.split(nnx.eval_shape(lambda: Llama(decode_config(config))))[0]


# The state is donated: the cache is written in place from call to call.
_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "greedy", "top_k"), donate_argnames=("state",))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "greedy", "top_k"), donate_argnames=("state",))
_empty_state_jit = jax.jit(empty_state, static_argnums=(0, 1, 2, 3))
# Once per generate call: XLA:CPU materialises a slice of the stacked weights wherever it is taken
# (a copy of every layer's weights, ~30 ms for the 58M model), so the programs get them pre-sliced.
_split_layers_jit = jax.jit(_split_layers, static_argnums=0)


# ---- the host loop: refill slots between chunks ---------------------------------------------------
@dataclasses.dataclass
class DecodeStats:
    """Counters of one `generate` call (so far, when passed to its callbacks)."""
    slots: int
    decode_steps: int = 0  # decode steps run (each over all slots)
    busy_slot_steps: int = 0  # slot-steps spent on an unfinished prompt (one draw each)
    started: int = 0  # prompts prefilled (one draw each)
    new_tokens: int = 0  # tokens of the finished prompts
    finished: int = 0  # prompts finished
    seconds: float = 0.0  # since the call started (compilation included)

    @property
    def occupancy(self) -> float:
        """The fraction of slot-steps that decoded a prompt (1.0 before any step)."""
        return self.busy_slot_steps / (self.slots * self.decode_steps) if self.decode_steps else 1.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens drawn per second so far (in-flight prompts' and stop tokens included)."""
        return (self.started + self.busy_slot_steps) / self.seconds if self.seconds > 0 else 0.0


class Generation(NamedTuple):
    tokens: list  # per prompt: the new tokens, without the stop token
    stopped: list  # per prompt: True if it ended on a stop id, False if it hit the length limit
    stats: Optional[DecodeStats] = None


def prompt_bucket(length: int) -> int:
    """The padded prefill length of a prompt: the smallest of 32·2^k and 48·2^k that holds it (at most
    ~1.5× the prompt; about two compiled prefill shapes per doubling of the prompt length)."""
    size = PROMPT_BUCKET
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_stop_ids(config) -> list[int]:
    """EOT (when the model has one) and EOS."""
    return [i for i in (config.eot_token_id, config.eos_token_id) if i is not None]


def _per_prompt(value, n: int, name: str) -> list[int]:
    """An int for every prompt, or a list with one int per prompt."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -2 ** 31 <= v < 2 ** 31:
            raise ValueError(f"{name} must be an int32 or a list of them, got {v!r}")
    return [int(v) for v in values]


def generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens, *, greedy: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.2,
             seed=0, stop_ids: Optional[Sequence[int]] = None, batch_size: int = 8,
             on_finish: Optional[Callable[[int, list, bool], None]] = None,
             on_chunk: Optional[Callable[[DecodeStats], None]] = None) -> Generation:
    """Generates for token-id prompts of any lengths with a LanguageModel `lm` (its parameters stay
    where they are, e.g. sharded on lm.mesh) in `batch_size` slots: a slot whose prompt finishes takes
    the next one while the others keep decoding. max_new_tokens and seed: an int, or one per prompt.
    Prompt i draws from prompt_key(seed, i) (int seed) or prompt_key(seed[i], 0) (a list), so its tokens
    depend on its prompt, settings and seed only. on_finish(i, tokens, stopped) is called as each
    prompt finishes, on_chunk(stats) after each chunk of decode steps; results are in prompt order."""
    n = len(prompts)
    limits = _per_prompt(max_new_tokens, n, "max_new_tokens")
    seeds = _per_prompt(seed, n, "seed")
    folds = [0] * n if isinstance(seed, (list, tuple, np.ndarray)) else list(range(n))
    _check_settings(lm.config, prompts, limits, greedy, temperature, top_p, top_k, repetition_penalty, batch_size)
    stats = DecodeStats(int(batch_size))
    if not n:
        return Generation([], [], stats)
    config = lm.config
    context = config.max_position_embeddings
    limits = [min(m, context - len(p)) for m, p in zip(limits, prompts)]
    tokens, stopped = [[] for _ in prompts], [False] * n
    todo = [i for i in range(n) if limits[i] > 0]
    if not todo:
        return Generation(tokens, stopped, stats)
    stop_ids = default_stop_ids(config) if stop_ids is None else [int(s) for s in stop_ids]
    settings = Settings(jnp.float32(temperature), jnp.float32(top_p), jnp.float32(repetition_penalty),
                        jnp.asarray(stop_ids + [-1], jnp.int32))
    cache_len = min(_round_up(max(len(prompts[i]) + limits[i] for i in todo), CACHE_BUCKET), context)
    width = _round_up(max(limits[i] for i in todo), CACHE_BUCKET)
    static = dict(greedy=bool(greedy), top_k=int(top_k))
    # Longest budgets first: without stops this fills the slots evenly (the tail is shortest).
    pending = collections.deque(sorted(todo, key=lambda i: -limits[i]))
    slot_prompt: list = [None] * int(batch_size)
    started = time.perf_counter()

    def harvest(host):
        """Finishes the prompts of done slots from a host copy (done, lengths, stopped, out)."""
        done, lengths, was_stopped, out = host
        for slot, i in enumerate(slot_prompt):
            if i is not None and done[slot]:
                tokens[i], stopped[i] = out[slot, : lengths[slot]].tolist(), bool(was_stopped[slot])
                slot_prompt[slot] = None
                stats.new_tokens += len(tokens[i])
                stats.finished += 1
                stats.seconds = time.perf_counter() - started
                if on_finish is not None:
                    on_finish(i, tokens[i], stopped[i])

    def fetch(state, *more):
        return jax.device_get((state.done, state.lengths, state.stopped, state.out) + more)

    graphdef = decode_graphdef(config)
    with lm._rules():
        layers = _split_layers_jit(graphdef, lm._state)
        state = _empty_state_jit(decode_config(config), int(batch_size), cache_len, width)
        while pending or any(i is not None for i in slot_prompt):
            while pending and None in slot_prompt:  # refill; a prompt may finish on its first token
                for slot in [s for s, i in enumerate(slot_prompt) if i is None]:
                    if not pending:
                        break
                    i = pending.popleft()
                    prompt = np.zeros((1, prompt_bucket(len(prompts[i]))), np.int32)
                    prompt[0, : len(prompts[i])] = prompts[i]
                    state = _prefill_jit(graphdef, lm._state, layers, state, slot, prompt, len(prompts[i]),
                                         limits[i], seeds[i], folds[i], settings, **static)
                    slot_prompt[slot] = i
                    stats.started += 1
                harvest(fetch(state))
            if all(i is None for i in slot_prompt):
                break
            state, steps, busy = _decode_jit(graphdef, lm._state, layers, state, settings, CHUNK_STEPS, **static)
            *host, steps, busy = fetch(state, steps, busy)
            stats.decode_steps += int(steps)
            stats.busy_slot_steps += int(busy)
            harvest(host)
            stats.seconds = time.perf_counter() - started
            if on_chunk is not None:
                on_chunk(stats)
    stats.seconds = time.perf_counter() - started
    return Generation(tokens, stopped, stats)


def _check_settings(config, prompts, limits, greedy, temperature, top_p, top_k, repetition_penalty, batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if any(m < 0 for m in limits):
        raise ValueError(f"max_new_tokens must be >= 0, got {min(limits)}")
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


def lower_decode_chunk(lm, batch_size: int, cache_len: int, max_new_tokens: int, *, greedy: bool = False,
                       top_k: int = 0) -> jax.stages.Lowered:
    """The decode program `generate` runs between refills, for these shapes, lowered, not run
    (`.compile().as_text()` shows what the decode loop compiles to)."""
    settings = Settings(jnp.float32(0.7), jnp.float32(0.9), jnp.float32(1.2), jnp.asarray([-1], jnp.int32))
    graphdef = decode_graphdef(lm.config)
    with lm._rules():
        state = _empty_state_jit(decode_config(lm.config), batch_size, cache_len, max_new_tokens)
        layers = _split_layers_jit(graphdef, lm._state)
        return _decode_jit.lower(graphdef, lm._state, layers, state, settings, CHUNK_STEPS, greedy=greedy,
                                 top_k=top_k)


# ---- the slot programs on abstract inputs (lima-aot) ----------------------------------------------
def _abstract_inputs(config, mesh, rules, batch_size: int, cache_len: int):
    """(graphdef, params, layers, state, settings, arg): the abstract inputs of the slot programs of
    decode_config(config) — parameters (pure dict), the per-layer parameters as `generate` passes them
    (nnx States), a DecodeState, Settings — with shardings from `rules` on `mesh`; arg(shape, dtype,
    names=None) makes one more abstract input."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lima_jax import sharding

    config = decode_config(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config)))
    p_shard = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), p_shard)

    def arg(shape, dtype, names=None):
        spec = sharding.logical_to_spec(names, rules, mesh, shape) if names else PartitionSpec()
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    def one_layer(var):  # a slice of a stacked parameter: its names without "layers"
        shape, names = var.shape[1:], tuple(var.get_metadata()["out_sharding"])[1:]
        return var.replace(arg(shape, var.dtype, names))

    layer = jax.tree.map(one_layer, abstract["layers"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    layers = [layer] * config.num_layers

    b, v = batch_size, config.vocab_size
    kv = jax.eval_shape(lambda: KVCache.zeros(config, b, cache_len))
    buffers = partial(jax.tree.map, lambda a: arg(a.shape, a.dtype, LAYER_CACHE_NAMES))
    cache = KVCache(buffers(kv.k), buffers(kv.v), arg((b, cache_len), jnp.bool_, ("batch", "length")),
                    arg((b,), jnp.int32, ("batch",)))
    rows = partial(arg, names=("batch",))
    state = DecodeState(cache=cache, seen=arg((b, v), jnp.bool_, ("batch", "vocab")), last=rows((b,), jnp.int32),
                        out=arg((b, cache_len), jnp.int32, ("batch", None)), lengths=rows((b,), jnp.int32),
                        step=rows((b,), jnp.int32), done=rows((b,), jnp.bool_), stopped=rows((b,), jnp.bool_),
                        limit=rows((b,), jnp.int32), keys=arg((b, 2), jnp.uint32, ("batch", None)))
    settings = Settings(arg((), jnp.float32), arg((), jnp.float32), arg((), jnp.float32), arg((2,), jnp.int32))
    return graphdef, params, layers, state, settings, arg


def _merge_abstract(config, graphdef, params):
    st = nnx.split(nnx.eval_shape(lambda: Llama(decode_config(config))))[1]
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)


def lower_decode_step(config, mesh, rules, batch_size: int, cache_len: int, *, greedy: bool = False,
                      top_k: int = 0):
    """`decode_step` — one token for every slot, the body of `generate`'s decode chunks, with the
    per-layer parameters as inputs as there — jitted with parameters and slot state sharded on `mesh`
    by `rules`, lowered on abstract inputs (nothing allocated), the state donated: what lima-aot
    compiles. (The layout is decode_config(config)'s: the unrolled layer loop.)"""
    from lima_jax import sharding

    graphdef, params, layers, state, settings, _ = _abstract_inputs(config, mesh, rules, batch_size, cache_len)

    def step(params, layers, state, settings):
        with sharding.use_rules(mesh, rules):
            return decode_step(_merge_abstract(config, graphdef, params), state, settings, greedy=greedy, top_k=top_k,
                               layers=layers)

    return jax.jit(step, donate_argnums=2).lower(params, layers, state, settings)


def lower_prefill_slot(config, mesh, rules, batch_size: int, cache_len: int, prompt_len: int, *,
                       greedy: bool = False, top_k: int = 0):
    """`prefill_slot` — one prompt of `prompt_len` (padded) tokens into one slot of the donated slot
    state — lowered on abstract inputs like `lower_decode_step`."""
    from lima_jax import sharding

    graphdef, params, layers, state, settings, arg = _abstract_inputs(config, mesh, rules, batch_size, cache_len)
    scalar = arg((), jnp.int32)

    def prefill(params, layers, state, slot, tokens, length, limit, seed, fold, settings):
        with sharding.use_rules(mesh, rules):
            return prefill_slot(_merge_abstract(config, graphdef, params), state, slot, tokens, length, limit, seed,
                                fold, settings, greedy=greedy, top_k=top_k, layers=layers)

    return jax.jit(prefill, donate_argnums=2).lower(params, layers, state, scalar, arg((1, prompt_len), jnp.int32),
                                                    scalar, scalar, scalar, scalar, settings)
