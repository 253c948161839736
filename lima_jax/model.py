"""LLaMA in Flax NNX, computing what transformers' LlamaForCausalLM computes.

Layout choices (see DESIGN.md):
- Rotary embeddings are HF's rotate-half, so HF → ours is a transpose and a reshape per tensor.
- Projections keep heads as their own axis: q [embed, heads, head_dim], o [heads, head_dim, embed].
- The decoder layers' parameters are stored stacked on a leading "layers" axis. `scan_layers=True`
  runs them with `jax.lax.scan`; `False` unrolls a Python loop over the same arrays, so the two
  modes share checkpoints.
- The KV cache is an explicit value (`KVCache`), passed in and returned, so decoding stays pure. Its
  layout follows the layer loop: stacked on a "layers" axis for the scan, one buffer per layer for
  the unrolled loop (see KVCache).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lima_jax import gpu_attention, sharding, splash_attention
from lima_jax.attention import causal_attention
from lima_jax.config import REMAT_SAVED_NAMES, LlamaConfig, default_attention_kernel
from lima_jax.sharding import constrain, gather_layer_params

_INIT_STD = 0.02  # transformers' LlamaConfig.initializer_range


def _param(key, shape, names, dtype, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    # Names are metadata only; placement happens when a mesh is chosen (sharding.py).
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


STACKED_CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "head_dim")
LAYER_CACHE_NAMES = ("batch", "kv_heads", "length", "head_dim")
# Between sublayers: "act_length", not "length", so the rules may split the sequence there (see DecoderLayer).
RESIDUAL_NAMES = ("batch", "act_length", "act_embed")


class KVCache(NamedTuple):
    """Keys/values of every layer for `max_len` slots. `mask[b, s]` marks slots holding real tokens
    (left padding is masked out); `index` is the next slot to write: an int32 scalar shared by all
    rows, or one per row [batch] (slot decoding: each row holds its own prompt at its own length; a
    row's mask is then False from its index on, so its real slots are counted, not scanned).

    k and v come in one of two layouts, chosen by `zeros` from config.scan_layers:
    - stacked, for the scanned layer loop: one array [layers, batch, max_len, kv_heads, head_dim];
    - per layer, for the unrolled loop: a tuple of arrays [batch, kv_heads, max_len, head_dim]. XLA:CPU
      copies a layer's slice out of stacked buffers at every read (15-25% of a 58M decode step at batch
      8); separate buffers are written in place and read where they lie, heads first so that each
      attention product is a plain batched matmul."""
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array  # [batch, max_len] bool
    index: jax.Array  # int32 scalar, or [batch] int32

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.dtype
        kvh, d = config.num_kv_heads, config.head_dim
        if config.scan_layers:
            k, v = (constrain(jnp.zeros((config.num_layers, batch, max_len, kvh, d), dtype), STACKED_CACHE_NAMES)
                    for _ in range(2))
        else:
            k, v = (tuple(constrain(jnp.zeros((batch, kvh, max_len, d), dtype), LAYER_CACHE_NAMES)
                          for _ in range(config.num_layers)) for _ in range(2))
        return cls(k, v, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)


class ModelOutput(NamedTuple):
    logits: jax.Array  # [batch, length, vocab] float32
    cache: Optional[KVCache] = None
    hidden_states: Optional[jax.Array] = None  # [layers + 1, batch, length, hidden], when asked for


# ---- rotary embeddings ------------------------------------------------------------------------
def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies (float32), with linear or Llama-3 scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = np.float32(scaling["original_max_position_embeddings"])
    low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(in_band, blended, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, num_positions: int) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, head_dim] in float32 for integer positions [B, T] in [0, num_positions), read
    from a table of every position. Computed per token instead, the cos and sin were fused into each
    layer's RoPE (forward and backward) and evaluated again there for every head: 2-3% of a 58M CPU
    train step."""
    freqs = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles)[positions], jnp.sin(angles)[positions]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim]; HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ---- modules ----------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig, stack: tuple[int, ...] = (), stack_names: tuple[str, ...] = ()):
        self.eps = config.rms_norm_eps
        self.scale = _param(None, stack + (config.hidden_size,), stack_names + ("embed",),
                            config.param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def residual_dropout(x: jax.Array, rate: jax.Array, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout with a (possibly traced) rate; identity when key is None (deterministic)."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, key: jax.Array, stack=(), stack_names=()):
        e, h, kvh, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kq, kk, kv, ko = jax.random.split(key, 4)
        pd = config.param_dtype
        self.q_proj = _param(kq, stack + (e, h, d), stack_names + ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(kk, stack + (e, kvh, d), stack_names + ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(kv, stack + (e, kvh, d), stack_names + ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(ko, stack + (h, d, e), stack_names + ("heads", "head_dim", "embed"), pd)
        self.num_groups = h // kvh
        self.attention_block = config.attention_block
        self.attention_kernel = config.attention_kernel

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        """x [B,T,E]; without a cache, mask is the segment ids [B,T] (causal_attention, or the kernel
        config.attention_kernel resolves to: splash on TPU, cuDNN on GPU); with one, a
        [B,T,S] bool (True = may attend). With a cache, the new keys/values are
        written at slot cache_index and attention runs over all S slots: kv_cache=(k, v, None) with
        this layer's buffers [B,KVH,S,D], or (k, v, layer) with the all-layer buffers [L,B,S,KVH,D].
        Returns (out [B,T,E], (k, v)): the new tokens' [B,T,KVH,D], or the updated buffers."""
        dtype = x.dtype
        q = _project(x, self.q_proj[...].astype(dtype))
        k = _project(x, self.k_proj[...].astype(dtype))
        v = _project(x, self.v_proj[...].astype(dtype))
        q = checkpoint_name(constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim")), "query_proj")
        k = checkpoint_name(constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim")), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", "length", "kv_heads", "head_dim")), "value_proj")
        if kv_cache is None:
            platform = sharding.platform()
            kernel = self.attention_kernel or default_attention_kernel(platform)
            if kernel == "splash":
                out = splash_attention.splash_causal_attention(q, k, v, mask)
            elif kernel == "cudnn":  # jax's own implementation of the same call off GPU (tests on the CPU)
                out = gpu_attention.cudnn_causal_attention(
                    q, k, v, mask, implementation="cudnn" if platform in ("gpu", "cuda") else "xla",
                    block=self.attention_block)
            else:
                out = causal_attention(q, k, v, mask, block=self.attention_block)
        else:
            k, v, keys, values = _write_cache(k, v, kv_cache, cache_index)
            out = _attend(q, keys.astype(dtype), values.astype(dtype), mask, self.num_groups)
        out = checkpoint_name(out, "attention_out")
        out = _matmul(out.reshape(*out.shape[:2], -1), self.o_proj[...].astype(dtype).reshape(-1, x.shape[-1]))
        return out, (k, v)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """[B, T, I] @ [I, O] as one 2-D matmul over B·T rows: XLA:CPU runs plain matrix products (and
    their gradients) far faster than dots with several batch or contracting dimensions."""
    b, t, i = x.shape
    return (x.reshape(b * t, i) @ w).reshape(b, t, w.shape[-1])


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, E] through w [E, heads, head_dim] → [B, T, heads, head_dim]."""
    e, h, d = w.shape
    return _matmul(x, w.reshape(e, h * d)).reshape(*x.shape[:2], h, d)


def _write_cache(k, v, kv_cache, index):
    """Writes the new keys/values [B,T,KVH,D] at slot `index` (scalar, or one per row [B]) of the cache
    buffers; returns the updated buffers and this layer's keys/values [B,KVH,S,D]. The slots are
    written first and the layer read back from the result, so the buffers are updated in place
    (reading the old layer first made XLA copy them whole)."""
    k_buffer, v_buffer, layer = kv_cache
    if jnp.ndim(index) == 1:
        return _write_cache_per_row(k, v, k_buffer, v_buffer, layer, index)
    if layer is None:  # this layer's own buffers [B,KVH,S,D]
        k_buffer = jax.lax.dynamic_update_slice(k_buffer, k.swapaxes(1, 2).astype(k_buffer.dtype), (0, 0, index, 0))
        v_buffer = jax.lax.dynamic_update_slice(v_buffer, v.swapaxes(1, 2).astype(v_buffer.dtype), (0, 0, index, 0))
        return k_buffer, v_buffer, k_buffer, v_buffer
    k_buffer = jax.lax.dynamic_update_slice(k_buffer, k[None].astype(k_buffer.dtype), (layer, 0, index, 0, 0))
    v_buffer = jax.lax.dynamic_update_slice(v_buffer, v[None].astype(v_buffer.dtype), (layer, 0, index, 0, 0))
    keys = jax.lax.dynamic_index_in_dim(k_buffer, layer, keepdims=False).swapaxes(1, 2)
    values = jax.lax.dynamic_index_in_dim(v_buffer, layer, keepdims=False).swapaxes(1, 2)
    return k_buffer, v_buffer, keys, values


def _write_cache_per_row(k, v, k_buffer, v_buffer, layer, index):
    """_write_cache with each row b written at its own slot index[b]: one update of a row's slot
    range per row (B is static and small), each in place like the shared-index write."""
    def write(buffer, new, b):
        if layer is None:  # [B,KVH,S,D] ← new [B,T,KVH,D]
            return jax.lax.dynamic_update_slice(buffer, new[b: b + 1].swapaxes(1, 2).astype(buffer.dtype),
                                                (b, 0, index[b], 0))
        return jax.lax.dynamic_update_slice(buffer, new[None, b: b + 1].astype(buffer.dtype),
                                            (layer, b, index[b], 0, 0))

    for b in range(k.shape[0]):
        k_buffer, v_buffer = write(k_buffer, k, b), write(v_buffer, v, b)
    if layer is None:
        return k_buffer, v_buffer, k_buffer, v_buffer
    keys = jax.lax.dynamic_index_in_dim(k_buffer, layer, keepdims=False).swapaxes(1, 2)
    values = jax.lax.dynamic_index_in_dim(v_buffer, layer, keepdims=False).swapaxes(1, 2)
    return k_buffer, v_buffer, keys, values


def _attend(q, keys, values, mask, num_groups):
    """Softmax attention over a cache: q [B,T,H,D], keys/values [B,KVH,S,D], mask [B,T,S] → [B,T,H,D].
    The query heads sharing a kv head are grouped with its rows, so both products are plain batched
    matmuls over (batch, kv head)."""
    b, t, h, d = q.shape
    kvh, s = keys.shape[1], keys.shape[2]
    q = q.reshape(b, t, kvh, num_groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, num_groups * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kvh, num_groups, t, s) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kvh, num_groups * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values)
    return out.reshape(b, kvh, num_groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, key: jax.Array, stack=(), stack_names=()):
        e, f, pd = config.hidden_size, config.intermediate_size, config.param_dtype
        kg, ku, kd = jax.random.split(key, 3)
        self.gate_proj = _param(kg, stack + (e, f), stack_names + ("embed", "mlp"), pd)
        self.up_proj = _param(ku, stack + (e, f), stack_names + ("embed", "mlp"), pd)
        self.down_proj = _param(kd, stack + (f, e), stack_names + ("mlp", "embed"), pd)

    def __call__(self, x):
        dtype = x.dtype
        gate = checkpoint_name(_matmul(x, self.gate_proj[...].astype(dtype)), "mlp_gate")
        up = checkpoint_name(_matmul(x, self.up_proj[...].astype(dtype)), "mlp_up")
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _matmul(hidden, self.down_proj[...].astype(dtype))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then + drop(mlp(norm(x))). Built with `stack=(L,)` it
    holds all L layers' parameters; the stack applies one slice at a time."""

    def __init__(self, config: LlamaConfig, key: jax.Array, stack=(), stack_names=()):
        ka, km = jax.random.split(key)
        self.input_norm = RMSNorm(config, stack, stack_names)
        self.attn = Attention(config, ka, stack, stack_names)
        self.post_attn_norm = RMSNorm(config, stack, stack_names)
        self.mlp = MLP(config, km, stack, stack_names)

    def __call__(self, x, cos, sin, mask, dropout_rate, dropout_key=None, kv_cache=None, cache_index=None):
        attn_key = mlp_key = None
        if dropout_key is not None:
            attn_key, mlp_key = jax.random.split(dropout_key)
        # The residual stream is RESIDUAL_NAMES: with `act_length` on the tensor axis (the default rules)
        # each tensor device keeps a slice of the sequence, so norms, dropout and adds are not done
        # tensor-times over, and each sublayer's sum lands on the slices instead of every device whole
        # (sequence parallelism).
        attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, cache_index)
        attn_out = checkpoint_name(constrain(attn_out, RESIDUAL_NAMES), "attention_proj")
        x = x + residual_dropout(attn_out, dropout_rate, attn_key)
        mlp_out = constrain(self.mlp(checkpoint_name(self.post_attn_norm(x), "mlp_in")), RESIDUAL_NAMES)
        x = x + residual_dropout(mlp_out, dropout_rate, mlp_key)
        return constrain(x, RESIDUAL_NAMES), new_kv


def remat_policy(name: str):
    """jax.checkpoint's policy for a config.REMAT_POLICIES name ("full" saves nothing: None)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return None
    if name in REMAT_SAVED_NAMES:
        return policies.save_only_these_names(*REMAT_SAVED_NAMES[name])
    if name.startswith("offload_") and name[len("offload_"):] in REMAT_SAVED_NAMES:
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(REMAT_SAVED_NAMES[name[len("offload_"):]]),
            offload_src="device", offload_dst="pinned_host")
    return getattr(policies, "checkpoint_" + name)


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, *, seed: int = 0):
        self.config = config
        k_embed, k_layers, k_head = jax.random.split(jax.random.key(seed), 3)
        pd = config.param_dtype
        self.embed = _param(k_embed, (config.padded_vocab_size, config.hidden_size), ("vocab", "embed"), pd)
        self.layers = DecoderLayer(config, k_layers, stack=(config.num_layers,), stack_names=("layers",))
        self.final_norm = RMSNorm(config)
        if not config.tie_word_embeddings:
            self.lm_head = _param(k_head, (config.hidden_size, config.padded_vocab_size), ("embed", "vocab"), pd)

    def __call__(self, tokens: jax.Array, attention_mask: Optional[jax.Array] = None,
                 cache: Optional[KVCache] = None, *, dropout_key: Optional[jax.Array] = None,
                 return_hidden_states: bool = False, last_logits_only: bool = False,
                 segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
                 logits_at: Optional[jax.Array] = None, layer_params: Optional[list] = None) -> ModelOutput:
        """tokens [B, T] int; attention_mask [B, T] (1 = real token, 0 = padding; default all real).

        Positions count real tokens only, so left- and right-padded rows get the positions they would
        have alone. Packed rows (no cache): segment_ids [B, T] (1, 2, ... per example, 0 = padding) and
        positions [B, T] (each token's index in its own example) replace attention_mask; a token
        attends only to earlier tokens of its own segment. With a cache, the T tokens are written at `cache.index` and may attend to every
        earlier real slot. dropout_key=None means deterministic (no dropout). last_logits_only: logits
        of the last position only (decoding's prefill skips the LM head on the others); logits_at [B]:
        logits of position logits_at[b] of each row only (a right-padded prompt's last real token).
        layer_params: the unrolled loop's per-layer parameters from `split_layers()`, computed once
        outside a decode loop, which then does not slice the stacked parameters again at every token
        (XLA:CPU materialises each slice: a copy of every layer's weights per step)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)

        if cache is None:
            if segment_ids is None:  # one example per row
                segment_ids = attention_mask.astype(jnp.int32)
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
            elif positions is None:
                raise ValueError("segment_ids need positions (each token's index in its own segment)")
            key_mask = segment_ids > 0
            mask = segment_ids  # attention builds the per-segment causal mask from the ids, block by block
            cache_index = None
        elif jnp.ndim(cache.index) == 1:  # each row writes at its own index
            cache_index = cache.index
            slots = jnp.arange(cache.mask.shape[1])
            offset = slots[None, :] - cache_index[:, None]  # [B, S]: slot s holds new token `offset`
            written = jnp.take_along_axis(attention_mask, jnp.clip(offset, 0, t - 1), axis=1)
            key_mask = jnp.where((offset >= 0) & (offset < t), written, cache.mask)
            # Real slots lie below each row's index: their count is the next token's position.
            before = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)[:, None]
            positions = jnp.maximum(before + jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1, 0)
            causal = slots[None, None, :] <= (cache_index[:, None] + jnp.arange(t)[None, :])[:, :, None]
            mask = causal & key_mask[:, None, :]
        else:
            cache_index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache_index))
            seen = jnp.cumsum(key_mask, axis=1) - 1
            positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(seen, cache_index, t, axis=1), 0)
            slots = jnp.arange(key_mask.shape[1])
            causal = slots[None, :] <= cache_index + jnp.arange(t)[:, None]
            mask = causal[None] & key_mask[:, None, :]
        # Positions count real tokens, so they stay below the number of key slots.
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(cfg), key_mask.shape[1])

        x = self.embed[...].astype(dtype)[tokens]
        x = constrain(x, RESIDUAL_NAMES)
        x, new_cache, hidden = self._run_layers(x, cos, sin, mask, dropout_key, cache, cache_index,
                                                return_hidden_states, layer_params)
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
        elif last_logits_only:
            x = x[:, -1:]
        x = constrain(self.final_norm(x), ("batch", "length", "act_embed"))  # whole rows: vocab is on tensor
        logits = self._lm_head(x)
        if cfg.padded_vocab_size != cfg.vocab_size:  # padding rows can never win a softmax or a sample
            real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
        logits = constrain(logits, ("batch", "length", "vocab"))
        if new_cache is not None:
            new_cache = new_cache._replace(mask=key_mask, index=cache_index + t)
        return ModelOutput(logits, new_cache, hidden)

    def _lm_head(self, x: jax.Array) -> jax.Array:
        """[B, T, E] → float32 logits [B, T, V], as one 2-D matmul over the B·T rows."""
        b, t, e = x.shape
        x = x.reshape(b * t, e)
        tied = self.config.tie_word_embeddings  # contract with the table's embed axis; no transposed copy
        head = (self.embed if tied else self.lm_head)[...].astype(x.dtype)
        logits = jnp.einsum("te,ve->tv" if tied else "te,ev->tv", x, head, preferred_element_type=jnp.float32)
        return logits.reshape(b, t, -1)

    def split_layers(self) -> list:
        """The stacked layer parameters as one tree per layer (for `layer_params`)."""
        return _unstack_layers(nnx.split(self.layers)[1], self.config.num_layers)

    def _run_layers(self, x, cos, sin, mask, dropout_key, cache, cache_index, return_hidden_states,
                    layer_params=None):
        cfg = self.config
        graphdef, stacked = nnx.split(self.layers)
        rates = jnp.asarray(cfg.layer_dropout_rates(), jnp.float32)

        def one_layer(x, layer_params, layer_index, kv):
            """kv: None, or the cache buffers the layer writes its slots into (see Attention)."""
            layer = nnx.merge(graphdef, gather_layer_params(layer_params))  # FSDP: per layer, in the loop
            dropping = dropout_key is not None and cfg.residual_dropout > 0  # no masks to draw at rate 0
            key = jax.random.fold_in(dropout_key, layer_index) if dropping else None
            return layer(x, cos, sin, mask, rates[layer_index], key, kv, cache_index)

        if cfg.remat_policy != "none":
            one_layer = jax.checkpoint(one_layer, policy=remat_policy(cfg.remat_policy))

        hidden = [x] if return_hidden_states else None
        if cfg.scan_layers:
            if layer_params is not None:
                raise ValueError("layer_params are for the unrolled layer loop (scan_layers=False)")
            if cache is not None and cache.per_layer:
                raise ValueError("the scanned layer loop needs a stacked KV cache; build it with scan_layers=True")

            def body(carry, xs):
                x, cache_kv = carry
                layer_params, layer_index = xs
                kv = None if cache_kv is None else (*cache_kv, layer_index)
                x, new_kv = one_layer(x, layer_params, layer_index, kv)
                if cache_kv is not None:
                    cache_kv = new_kv
                return (x, cache_kv), (x if return_hidden_states else None)

            cache_kv = None if cache is None else (cache.k, cache.v)
            (x, cache_kv), outputs = jax.lax.scan(body, (x, cache_kv), (stacked, jnp.arange(cfg.num_layers)))
            if return_hidden_states:
                hidden = jnp.concatenate([hidden[0][None], outputs], axis=0)
        else:
            if cache is not None and not cache.per_layer:
                raise ValueError("the unrolled layer loop needs a per-layer KV cache; build it with scan_layers=False")
            ks, vs = (None, None) if cache is None else (list(cache.k), list(cache.v))
            layers = _unstack_layers(stacked, cfg.num_layers) if layer_params is None else layer_params
            for i, params in enumerate(layers):
                x, new_kv = one_layer(x, params, i, None if cache is None else (ks[i], vs[i], None))
                if cache is not None:
                    ks[i], vs[i] = new_kv
                if return_hidden_states:
                    hidden.append(x)
            if return_hidden_states:
                hidden = jnp.stack(hidden)
            cache_kv = None if cache is None else (tuple(ks), tuple(vs))
        new_cache = None if cache is None else KVCache(cache_kv[0], cache_kv[1], cache.mask, cache.index)
        return x, new_cache, hidden

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.zeros(self.config, batch, max_len)


def _unstack_layers(stacked, num_layers: int) -> list:
    """The stacked layer parameters as one tree per layer, through one split per parameter: its
    gradient is one concatenation of the layers' gradients. Indexing each layer (`a[i]`) instead made
    each layer's gradient a zero-padded copy of the whole stack, which the optimizer then summed."""
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [jnp.split(a, num_layers, axis=0) for a in leaves]
    return [treedef.unflatten([jnp.squeeze(p[i], 0) for p in parts]) for i in range(num_layers)]


def param_logical_names(model: nnx.Module) -> dict:
    """{path tuple: logical names} for every parameter, from the metadata set at creation."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[tuple(str(p) for p in path)] = var.get_metadata().get("out_sharding")
    return out


def abstract_params(config: LlamaConfig) -> dict:
    """The parameter tree (nnx.to_pure_dict layout) as ShapeDtypeStructs, nothing materialised."""
    state = nnx.state(nnx.eval_shape(lambda: Llama(config)))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
