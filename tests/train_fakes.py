"""A small in-memory stand-in for data_pipeline.inputs.TrainInput (same constructor, iteration, state),
so the training tests need no TFDS build. Each example is an arithmetic progression of token ids (easy
to learn: the loss falls in a few steps), with a "user" prefix at weight 0 and right padding.

LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1 (seconds): sleep before each batch after the first epoch, so a test
can kill the run right after its first checkpoint."""
from __future__ import annotations

import math
import os
import time

import numpy as np

NUM_EXAMPLES = 24


class ArrayInput:
    def __init__(self, mixture, data_dir, tokenizer_path, global_batch_size, max_len, seed, shard_index=0,
                 num_shards=1, split="train"):
        rng = np.random.default_rng(1234)
        vocab = 500
        self.features = {k: np.zeros((NUM_EXAMPLES, max_len), np.int32)
                         for k in ("decoder_input_tokens", "decoder_target_tokens")}
        self.features["decoder_loss_weights"] = np.zeros((NUM_EXAMPLES, max_len), np.float32)
        for i in range(NUM_EXAMPLES):
            length = int(rng.integers(max_len // 2, max_len + 1))
            start, stride = int(rng.integers(3, vocab)), int(rng.integers(1, 4))
            seq = 3 + (start + stride * np.arange(length)) % (vocab - 3)
            self.features["decoder_target_tokens"][i, :length] = seq
            self.features["decoder_input_tokens"][i, :length] = np.concatenate([[1], seq[:-1]])
            self.features["decoder_loss_weights"][i, length // 4:length] = 1.0
        self.seed, self.global_batch_size = seed, global_batch_size
        self.host_batch_size = global_batch_size // num_shards
        self.shard_index = shard_index
        self.num_examples = NUM_EXAMPLES
        self.steps_per_epoch = math.ceil(NUM_EXAMPLES / global_batch_size)
        self._epoch, self._step = 0, 0
        self._delay = float(os.environ.get("LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1", "0"))

    def get_state(self):
        return {"epoch": self._epoch, "step_in_epoch": self._step}

    def set_state(self, state):
        self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])

    def __iter__(self):
        return self

    def __next__(self):
        if self._delay and self._epoch >= 1:
            time.sleep(self._delay)
        order = np.random.default_rng([self.seed, self._epoch]).permutation(NUM_EXAMPLES)
        ids = np.full(self.global_batch_size, -1)
        chunk = order[self._step * self.global_batch_size:(self._step + 1) * self.global_batch_size]
        ids[:len(chunk)] = chunk
        ids = ids[self.shard_index * self.host_batch_size:(self.shard_index + 1) * self.host_batch_size]
        out = {}
        for k, v in self.features.items():
            rows = np.zeros((len(ids), v.shape[1]), v.dtype)
            rows[ids >= 0] = v[ids[ids >= 0]]
            out[k] = rows
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return out
