"""`LanguageModel`: what `lima_jax.load_pretrained` returns: a config, parameters and compiled calls."""
from __future__ import annotations

import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lima_jax import sharding
from lima_jax.config import LlamaConfig
from lima_jax.model import Llama


def build_model(config: LlamaConfig, params: Optional[dict] = None, mesh: Optional[Mesh] = None,
                rules: sharding.Rules = sharding.DEFAULT_RULES, seed: int = 0) -> Llama:
    """A Llama with `params` (our nested-dict layout, numpy or jax arrays) or random weights, placed on
    `mesh` by the logical rules when a mesh is given. With params, nothing random is materialised."""
    if params is None:
        model = Llama(config, seed=seed)
        graphdef, state = nnx.split(model)
    else:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, seed=seed)))
        dtype = jnp.dtype(config.param_dtype)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), params))
    if mesh is not None:
        shardings = sharding.param_shardings(state, mesh, rules)
        state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    else:
        state = jax.tree.map(lambda v: v.replace(jnp.asarray(v[...])), state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def _forward_logits(graphdef, state, tokens, attention_mask):
    return nnx.merge(graphdef, state)(tokens, attention_mask).logits


_forward_logits_jit = jax.jit(_forward_logits, static_argnums=0)


class LanguageModel:
    """A loaded model. `logits(tokens)` runs the full forward; `generate` comes with decoding."""

    def __init__(self, config: LlamaConfig, model: Llama, mesh: Optional[Mesh] = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES):
        self.config = config
        self.model = model
        self.mesh = mesh
        self.rules = rules
        self._graphdef, self._state = nnx.split(model)

    def params(self) -> dict:
        """Our nested-dict parameter tree (jax arrays)."""
        return nnx.to_pure_dict(self._state)

    def logits(self, tokens, attention_mask=None) -> np.ndarray:
        """tokens: int [B, T] → float32 numpy [B, T, V]. attention_mask (optional, 1 = real token) lets
        padded rows be scored as if alone."""
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {tokens.min()}..{tokens.max()}")
        mask = np.ones_like(tokens, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        with self._rules():
            out = _forward_logits_jit(self._graphdef, self._state, jnp.asarray(tokens), jnp.asarray(mask))
        return np.asarray(out[..., : self.config.vocab_size], np.float32)

    def generate(self, prompts, max_new_tokens: int | list[int] = 2048, greedy: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.2,
                 seed: int | list[int] = 0, stop_ids=None, batch_size: int = 8) -> list[list[int]]:
        """New tokens for each prompt (token-id lists of any lengths), without the stop token, in prompt
        order. max_new_tokens and seed: one for all prompts or a list with one per prompt; a prompt's
        tokens depend on its prompt, the settings and its seed only (an int seed gives prompt i its own
        key from seed and i). batch_size prompts decode at once; a finished one's slot takes the next.
        stop_ids=None stops on EOT (when the model has one) and EOS; [] never stops. See decoding.py."""
        from lima_jax import decoding

        return decoding.generate(self, prompts, max_new_tokens, greedy=greedy, temperature=temperature,
                                 top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                 stop_ids=stop_ids, batch_size=batch_size).tokens

    def _rules(self):
        return contextlib.nullcontext() if self.mesh is None else sharding.use_rules(self.mesh, self.rules)
