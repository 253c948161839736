"""Training input for lima-train: every example once per epoch, in a seeded order, split across hosts.

LIMA is ~1k examples, so the mixture is tokenised once (seqio tasks + LimaFeatureConverter) and held
in memory. Epoch e's order is a permutation drawn from (seed, e). Global batch i of an epoch is rows
[i*B, (i+1)*B) of that order; host h keeps the contiguous block [h*B/H, (h+1)*B/H) of every global batch
(its seqio.ShardInfo), so the hosts' blocks concatenated in host order are the one-host batch exactly.
Every host tokenises the whole (small) set so that all hosts agree on one global order. The last
batch of an epoch is filled with all-zero rows (loss weight 0). The position is (epoch, step_in_epoch),
saved with every checkpoint, so a resumed run continues with exactly the next batch.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import seqio

from data_pipeline import tasks

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


def default_shard_info() -> seqio.ShardInfo:
    """This host's shard: the JAX process index among the process count."""
    import jax
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Example ids in the order epoch `epoch` visits them (deterministic, different per epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


class TrainInput:
    """Iterator of this host's batches: {decoder_input_tokens, decoder_target_tokens, decoder_loss_weights},
    int32 arrays of shape [global_batch_size // num_shards, max_len]; runs forever over epochs.

    After each `next()`, `epoch` / `step_in_epoch` say which batch was returned and `example_ids` its
    rows' example ids (-1 for padding rows).
    """

    def __init__(self, mixture: str, data_dir: str, tokenizer_path: str, global_batch_size: int, max_len: int,
                 seed: int, shard_index: int = 0, num_shards: int = 1, split: str = "train",
                 shard_info: Optional[seqio.ShardInfo] = None):
        self.shard_info = shard_info or seqio.ShardInfo(index=shard_index, num_shards=num_shards)
        n_shards, index = self.shard_info.num_shards, self.shard_info.index
        if global_batch_size % n_shards:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {n_shards} hosts")
        if not 0 <= index < n_shards:
            raise ValueError(f"shard index {index} is outside [0, {n_shards})")
        tasks.register(data_dir, tokenizer_path, mixture=mixture)
        self.examples = tasks.load_examples(mixture, split=split, max_len=max_len)
        if not self.examples:
            raise ValueError(f"{data_dir}: mixture {mixture!r} has no examples in split {split!r}")
        self.features = tasks.to_model_features(self.examples, max_len)
        self.mixture, self.seed, self.max_len = mixture, int(seed), int(max_len)
        self.global_batch_size = int(global_batch_size)
        self.host_batch_size = self.global_batch_size // n_shards
        self.num_examples = len(self.examples)
        self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch_size)
        self._epoch, self._step = 0, 0  # the NEXT batch to produce
        self.epoch = self.step_in_epoch = None  # the batch last produced
        self.example_ids = None

    # -- position ---------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"epoch": self._epoch, "step_in_epoch": self._step}

    def set_state(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"data iterator state {state} is outside 0..{self.steps_per_epoch} steps per epoch")
        if step == self.steps_per_epoch:  # saved right at an epoch's end
            epoch, step = epoch + 1, 0
        self._epoch, self._step = epoch, step

    # -- order ------------------------------------------------------------------------------------
    def epoch_examples(self, epoch: int) -> np.ndarray:
        """The example ids epoch `epoch` visits, in order (all hosts together)."""
        return epoch_order(self.seed, epoch, self.num_examples)

    def batch_example_ids(self, epoch: int, step: int) -> np.ndarray:
        """This host's rows of global batch `step` of `epoch`: example ids, -1 for padding rows."""
        order = self.epoch_examples(epoch)
        ids = np.full(self.global_batch_size, -1, np.int64)
        chunk = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
        ids[:len(chunk)] = chunk
        start = self.shard_info.index * self.host_batch_size
        return ids[start:start + self.host_batch_size]

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        ids = self.batch_example_ids(epoch, step)
        out = {}
        for name in FEATURES:
            rows = np.zeros((len(ids), self.max_len), np.int32)
            real = ids >= 0
            rows[real] = self.features[name][ids[real]]
            out[name] = rows
        return out

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, step = self._epoch, self._step
        out = self.batch(epoch, step)
        self.epoch, self.step_in_epoch = epoch, step
        self.example_ids = self.batch_example_ids(epoch, step)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = epoch + 1, 0
        return out
