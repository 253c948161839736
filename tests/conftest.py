"""Shared fixtures: random transformers LLaMA models saved as HF folders, and ../shared assets."""
from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
LLAMA_TOKENIZER = os.path.join(SHARED, "assets", "llama-tokenizer", "tokenizer.model")
LIMA_SAMPLE = os.path.join(SHARED, "assets", "lima-sample", "train.sample.jsonl")

needs_llama_tokenizer = pytest.mark.skipif(
    not os.path.exists(LLAMA_TOKENIZER), reason=f"../shared LLaMA tokenizer absent ({LLAMA_TOKENIZER})")
needs_lima_sample = pytest.mark.skipif(
    not os.path.exists(LIMA_SAMPLE), reason=f"../shared LIMA sample absent ({LIMA_SAMPLE})")

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


def make_hf_model(seed: int = 0, **overrides):
    """A random float32 transformers LlamaForCausalLM (eval mode) of tiny size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF, **overrides})).eval()
    # Norm weights start at 1.0 in transformers; randomise them so the map of every tensor is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a random HF model and return (model, folder)."""
    def make(seed: int = 0, max_shard_size=None, **overrides):
        model = make_hf_model(seed, **overrides)
        folder = tmp_path / f"hf_{seed}_{len(os.listdir(tmp_path))}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(str(folder), **kwargs)
        return model, str(folder)
    return make


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(np.asarray(attention_mask))}
        return model(torch.tensor(np.asarray(tokens, dtype=np.int64)), **kwargs).logits.float().numpy()
