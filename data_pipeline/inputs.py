"""Training input for lima-train: every example once per epoch, in a seeded order, split across hosts.

LIMA is ~1k examples, so the mixture is tokenised once (seqio tasks + LimaFeatureConverter) and held
in memory. Epoch e's order is a permutation drawn from (seed, e). Global batch i of an epoch is
examples [i*B, (i+1)*B) of that order. Padded (packing=False), each example is a row and host h keeps
the contiguous block [h*B/H, (h+1)*B/H) of the batch's rows (its seqio.ShardInfo), so the hosts' blocks
concatenated in host order are the one-host batch exactly; the last batch of an epoch is filled with
empty rows (loss weight 0). Packed (packing=True, data_pipeline/packing.py), the same B examples are
packed into R rows, R a bucket chosen from the mixture's lengths; every host computes the same global
rows and keeps its block of them. Every host tokenises the whole (small) set so that all hosts agree
on one global order. The position is (epoch, step_in_epoch), saved with every checkpoint, so a resumed
run continues with exactly the next batch.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import seqio

from data_pipeline import packing as packing_lib, tasks

FEATURES = packing_lib.TOKEN_FEATURES + packing_lib.SEGMENT_FEATURES
BUCKET_EPOCHS = 20  # epochs of steps whose packed row counts choose the buckets


def default_shard_info() -> seqio.ShardInfo:
    """This host's shard: the JAX process index among the process count."""
    import jax
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Example ids in the order epoch `epoch` visits them (deterministic, different per epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


class StepInput:
    """Iterator of this host's batches of in-memory examples, padded or packed, forever over epochs:
    {decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, decoder_segment_ids,
    decoder_positions}, arrays of shape [rows, max_len] (padded: rows = global_batch_size // num_shards).

    features: {token feature: [N, max_len] array}; lengths: each example's tokens. row_multiple: the
    global row count of a packed step is a multiple of it (the devices the batch is sharded over,
    times gradient-accumulation microbatches). After each `next()`, `epoch` / `step_in_epoch` say which
    batch was returned and `example_ids` this host's block of the padded batch's example ids (-1 for
    padding; packed rows hold the whole step's examples, see `global_example_ids`)."""

    def __init__(self, features: dict, lengths, global_batch_size: int, max_len: int, seed: int,
                 shard_index: int = 0, num_shards: int = 1, packing: bool = False, row_multiple: int = 1):
        if global_batch_size % num_shards:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {num_shards} hosts")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard index {shard_index} is outside [0, {num_shards})")
        self.features = features
        self.lengths = np.asarray(lengths, np.int64)
        self.seed, self.max_len = int(seed), int(max_len)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        self.global_batch_size = int(global_batch_size)
        self.host_batch_size = self.global_batch_size // self.num_shards
        self.num_examples = len(self.lengths)
        self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch_size)
        self.packing = bool(packing)
        self.row_multiple = packing_lib.round_up(max(int(row_multiple), 1), self.num_shards)
        self.buckets: list[int] = []
        if self.packing:
            needs = [self._packed_rows(e, s) for e in range(BUCKET_EPOCHS) for s in range(self.steps_per_epoch)]
            self.buckets = packing_lib.choose_buckets(needs, self.row_multiple)
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

    def global_example_ids(self, epoch: int, step: int) -> np.ndarray:
        """Global batch `step` of `epoch`: example ids, -1 for padding rows."""
        ids = np.full(self.global_batch_size, -1, np.int64)
        chunk = self.epoch_examples(epoch)[step * self.global_batch_size:(step + 1) * self.global_batch_size]
        ids[:len(chunk)] = chunk
        return ids

    def batch_example_ids(self, epoch: int, step: int) -> np.ndarray:
        """This host's rows of padded global batch `step` of `epoch`: example ids, -1 for padding rows."""
        start = self.shard_index * self.host_batch_size
        return self.global_example_ids(epoch, step)[start:start + self.host_batch_size]

    def _layout(self, ids: np.ndarray) -> list[list[int]]:
        return packing_lib.first_fit_decreasing(self.lengths[ids[ids >= 0]], self.max_len)

    def _packed_rows(self, epoch: int, step: int) -> int:
        return len(self._layout(self.global_example_ids(epoch, step)))

    def _bucket(self, needed: int) -> int:
        fallback = packing_lib.round_up(self.global_batch_size, self.row_multiple)
        return packing_lib.bucket_for(needed, self.buckets, fallback)

    def rows(self, epoch: int, step: int) -> int:
        """The global row count of step `step` of `epoch`."""
        return self._bucket(self._packed_rows(epoch, step)) if self.packing else self.global_batch_size

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        if not self.packing:
            return packing_lib.unpacked(self.features, self.lengths, self.batch_example_ids(epoch, step),
                                        self.max_len)
        ids = self.global_example_ids(epoch, step)
        layout = self._layout(ids)  # once per step: it gives both the row count and the rows
        rows = self._bucket(len(layout))
        both = packing_lib.pack(self.features, self.lengths, ids, rows, self.max_len, layout=layout)
        per_host = rows // self.num_shards
        return {k: v[self.shard_index * per_host:(self.shard_index + 1) * per_host] for k, v in both.items()}

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


class TrainInput(StepInput):
    """StepInput over a seqio mixture of the TFDS `lima` data (tasks.register)."""

    def __init__(self, mixture: str, data_dir: str, tokenizer_path: str, global_batch_size: int, max_len: int,
                 seed: int, shard_index: int = 0, num_shards: int = 1, split: str = "train",
                 shard_info: Optional[seqio.ShardInfo] = None, packing: bool = False, row_multiple: int = 1):
        shard_info = shard_info or seqio.ShardInfo(index=shard_index, num_shards=num_shards)
        if global_batch_size % shard_info.num_shards:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {shard_info.num_shards} hosts")
        tasks.register(data_dir, tokenizer_path, mixture=mixture)
        self.examples = tasks.load_examples(mixture, split=split, max_len=max_len)
        if not self.examples:
            raise ValueError(f"{data_dir}: mixture {mixture!r} has no examples in split {split!r}")
        self.mixture, self.shard_info = mixture, shard_info
        # An example of L tokens gives L - 1 (input, target) positions.
        lengths = [max(min(len(e["targets"]), max_len) - 1, 1) for e in self.examples]
        super().__init__(tasks.to_model_features(self.examples, max_len), lengths, global_batch_size, max_len,
                         seed, shard_info.index, shard_info.num_shards, packing, row_multiple)
