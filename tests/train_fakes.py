"""A small in-memory stand-in for data_pipeline.inputs.TrainInput (same constructor, iteration, state,
padded or packed), so the training tests need no TFDS build. Each example is an arithmetic progression
of token ids (easy to learn: the loss falls in a few steps), with a "user" prefix at weight 0.

LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1 (seconds): sleep before each batch after the first epoch, so a test
can kill the run right after its first checkpoint."""
from __future__ import annotations

import os
import time

import numpy as np

from data_pipeline.inputs import StepInput

NUM_EXAMPLES = 24


def fake_examples(max_len: int, vocab: int = 500):
    """(features {name: [NUM_EXAMPLES, max_len]}, lengths): lengths from max_len // 4 to max_len."""
    rng = np.random.default_rng(1234)
    features = {k: np.zeros((NUM_EXAMPLES, max_len), np.int32) for k in ("decoder_input_tokens", "decoder_target_tokens")}
    features["decoder_loss_weights"] = np.zeros((NUM_EXAMPLES, max_len), np.float32)
    lengths = []
    for i in range(NUM_EXAMPLES):
        length = int(rng.integers(max_len // 4, max_len + 1))
        start, stride = int(rng.integers(3, vocab)), int(rng.integers(1, 4))
        seq = 3 + (start + stride * np.arange(length)) % (vocab - 3)
        features["decoder_target_tokens"][i, :length] = seq
        features["decoder_input_tokens"][i, :length] = np.concatenate([[1], seq[:-1]])
        features["decoder_loss_weights"][i, length // 4:length] = 1.0
        lengths.append(length)
    return features, lengths


class ArrayInput(StepInput):
    def __init__(self, mixture, data_dir, tokenizer_path, global_batch_size, max_len, seed, shard_index=0,
                 num_shards=1, split="train", packing=False, row_multiple=1):
        features, lengths = fake_examples(max_len)
        super().__init__(features, lengths, global_batch_size, max_len, seed, shard_index, num_shards, packing,
                         row_multiple)
        self._delay = float(os.environ.get("LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1", "0"))

    def __next__(self):
        if self._delay and self._epoch >= 1:
            time.sleep(self._delay)
        return super().__next__()
