"""lima-jax: LIMA fine-tuning of LLaMA in JAX/Flax.

    lm = lima_jax.load_pretrained("path/to/hf_or_checkpoint", dtype="float32")
    lm.logits(tokens)   # int32 [B, T] -> float32 [B, T, V]
"""
from lima_jax.checkpoint import load_pretrained
from lima_jax.config import PRESETS, LlamaConfig, preset
from lima_jax.language_model import LanguageModel

__all__ = ["load_pretrained", "LlamaConfig", "LanguageModel", "PRESETS", "preset"]
__version__ = "0.1.0"
