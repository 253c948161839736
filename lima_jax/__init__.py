"""lima-jax: LIMA fine-tuning of LLaMA in JAX/Flax.

    lm = lima_jax.load_pretrained("path/to/hf_or_checkpoint", dtype="float32")
    lm.logits(tokens)   # int32 [B, T] -> float32 [B, T, V]
"""
import importlib

# Loaded on first use, so the console scripts answer --help and bad input before JAX starts.
_EXPORTS = {"load_pretrained": "lima_jax.checkpoint", "LlamaConfig": "lima_jax.config",
            "LanguageModel": "lima_jax.language_model", "PRESETS": "lima_jax.config", "preset": "lima_jax.config"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lima_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
