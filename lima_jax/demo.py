"""`make demo`: the main job end to end on the embedded default (grows with the project)."""
from __future__ import annotations

import numpy as np

import lima_jax
from lima_jax.language_model import LanguageModel, build_model


def main() -> None:
    config = lima_jax.preset("tiny")
    lm = LanguageModel(config, build_model(config, seed=0))
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    logits = lm.logits(tokens)
    print(f"tiny LLaMA: {config.num_params():,} parameters; logits {logits.shape}")
    print("last position, first 8 logits:", np.round(logits[0, -1, :8], 4))


if __name__ == "__main__":
    main()
