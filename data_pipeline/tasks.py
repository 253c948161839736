"""seqio for LIMA: a vocabulary with EOT, one task per source, the mixtures, and the feature converter.

Names (registered by `register(data_dir, tokenizer_path)`; seqio's registries are global, so the
function is idempotent and re-points the names when called with another data_dir or tokenizer):
  tasks     lima_stackexchange, lima_authors, lima_wikihow, lima_nlp, lima_writingprompts, lima_multi_turn
  mixtures  lima_1k           the single-turn sources (LIMA §2), rates = example counts
            lima_1k_dialogue  lima_1k plus the multi-turn chains (LIMA §6)
            lima_only_SOURCE  one source, all of its examples (§5 diversity ablations)
            lima_SOURCE_nN_seedS  N examples of one source drawn with seed S (§5 quantity ablations);
                              registered on demand when such a name is asked for.
Tokenisation goes through lima_jax.chat_format.encode_conversation, the one definition of the format.
Rates by count only matter to seqio's own sampler; inputs.TrainInput reads every task once per epoch.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipeline import lima_dataset
from lima_jax.chat_format import encode_conversation
from lima_jax.tokenizer import Tokenizer, eot_id_for

SOURCES = lima_dataset.SOURCES
SINGLE_TURN_SOURCES = tuple(s for s in SOURCES if s != "multi_turn")
MIXTURE_1K = "lima_1k"
MIXTURE_DIALOGUE = "lima_1k_dialogue"
_SUBSET = re.compile(r"^lima_(?P<source>[a-z_]+?)_n(?P<n>\d+)_seed(?P<seed>\d+)$")
TFDS_NAME = f"{lima_dataset.NAME}:{lima_dataset.DATA_VERSION}"


def task_name(source: str) -> str:
    return f"lima_{source}"


def only_mixture_name(source: str) -> str:
    return f"lima_only_{source}"


def subset_mixture_name(source: str, n: int, seed: int) -> str:
    return f"lima_{source}_n{n}_seed{seed}"


class LimaVocabulary(seqio.SentencePieceVocabulary):
    """A sentencepiece vocabulary plus EOT, whose id is the sentencepiece size (lima_jax.tokenizer's rule)."""

    @property
    def eot_id(self) -> int:
        return eot_id_for(self.tokenizer.GetPieceSize())

    @property
    def _base_vocab_size(self):
        return self.eot_id + 1

    def _decode(self, ids):
        return super()._decode([int(i) for i in ids if int(i) < self.eot_id])

    def _decode_tf(self, ids):
        ids = tf.convert_to_tensor(ids)
        return super()._decode_tf(tf.ragged.boolean_mask(ids, ids < self.eot_id))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def encode_chat(tokenizer_path: str):
    """Preprocessor: conversations -> targets (the chat-format tokens) and loss_mask, untruncated."""
    def encode(turns):
        tokens, mask = encode_conversation([t.decode("utf-8") for t in turns], _tokenizer(tokenizer_path))
        return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)

    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        def map_fn(ex):
            tokens, mask = tf.numpy_function(encode, [ex["conversations"]], [tf.int32, tf.int32], stateful=False)
            tokens.set_shape([None])
            mask.set_shape([None])
            return {"targets": tokens, "loss_mask": mask, "source": ex["source"], "index": ex["index"]}
        return ds.map(map_fn)
    return fn


def keep_source(source: str):
    def fn(ds):
        return ds.filter(lambda ex: tf.equal(ex["source"], source))
    return fn


def keep_indices(indices: Sequence[int]):
    """Keep the examples whose line number is in `indices` (an ablation subset)."""
    wanted = tf.constant(sorted(int(i) for i in indices), tf.int32)

    def fn(ds):
        return ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex["index"], tf.int32), wanted)))
    return fn


def output_features(tokenizer_path: str) -> dict:
    return {
        "targets": seqio.Feature(LimaVocabulary(tokenizer_path), add_eos=False, dtype=tf.int32),
        "loss_mask": seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32),
    }


class LimaFeatureConverter(seqio.FeatureConverter):
    """(targets, loss_mask) -> decoder_input_tokens / decoder_target_tokens / decoder_loss_weights.

    The chat-format tokens already start with BOS, so the shift is within the sequence:
    inputs = tokens[:-1], targets = tokens[1:], weights = loss_mask[1:] (the mask of the predicted token).
    Padded to the task length with 0 (LLaMA's <unk>; weight 0 so never learned). Packing is off by
    default; when on, it adds decoder_segment_ids / decoder_positions.
    """

    TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     "loss_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {"decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def __init__(self, pack: bool = False, **kwargs):
        super().__init__(pack=pack, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        def shift(ex):
            return {"decoder_input_tokens": ex["targets"][:-1], "decoder_target_tokens": ex["targets"][1:],
                    "decoder_loss_weights": ex["loss_mask"][1:]}
        ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
        length = task_feature_lengths["targets"]
        lengths = {k: length for k in self.MODEL_FEATURES}
        if not self.pack:
            return seqio.utils.trim_and_pad_dataset(ds, lengths)
        # seqio's packer treats 0 as padding inside a feature (it mangled 0/1 weights in a test), so the
        # weights travel as weight + 1 and come back after packing (padding 0 -> -1 -> clipped to 0).
        ds = ds.map(lambda ex: {**ex, "decoder_loss_weights": ex["decoder_loss_weights"] + 1})
        ds = seqio.utils.trim_and_pack_dataset(ds, lengths, self._use_custom_packing_ops)

        def rename(ex):
            out = {k: ex[k] for k in self.MODEL_FEATURES}
            out["decoder_loss_weights"] = tf.maximum(ex["decoder_loss_weights"] - 1, 0)
            out["decoder_segment_ids"] = ex["decoder_input_tokens_segment_ids"]
            out["decoder_positions"] = ex["decoder_input_tokens_positions"]
            return out
        return ds.map(rename, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {k: length for k in names}


# name -> the (data_dir, tokenizer_path) it was registered for
_REGISTERED: dict[str, tuple] = {}


def _add_task(name: str, key: tuple, preprocessors: list, tokenizer_path: str, data_dir: str) -> None:
    if _REGISTERED.get(name) == key:
        return
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.TfdsDataSource(tfds_name=TFDS_NAME, tfds_data_dir=data_dir),
        preprocessors=[encode_chat(tokenizer_path)] + preprocessors,
        output_features=output_features(tokenizer_path),
        shuffle_buffer_size=None)
    _REGISTERED[name] = key


def _add_mixture(name: str, key: tuple, tasks_and_rates: list) -> None:
    if _REGISTERED.get(name) == key:
        return
    seqio.MixtureRegistry.remove(name)
    # A source with no examples keeps a tiny rate: seqio refuses rate 0, and an empty task adds nothing.
    seqio.MixtureRegistry.add(name, [(t, max(float(r), 1e-6)) for t, r in tasks_and_rates])
    _REGISTERED[name] = key


@functools.lru_cache(maxsize=16)
def _train_lines(data_dir: str) -> dict:
    """{source: sorted line numbers} of the train split (counts for rates, pools for subsets)."""
    out = {s: [] for s in SOURCES}
    for ex in lima_dataset.load_split(data_dir, "train"):
        out[ex["source"]].append(ex["index"])
    return {s: sorted(v) for s, v in out.items()}


def subset_lines(data_dir: str, source: str, n: int, seed: int) -> list[int]:
    """The N train lines of one source drawn without replacement with `seed`."""
    pool = _train_lines(data_dir)[source]
    if n > len(pool):
        raise ValueError(f"{data_dir}: source {source!r} has {len(pool)} training examples, fewer than n={n}")
    return sorted(np.random.default_rng(seed).choice(pool, size=n, replace=False).tolist())


def register(data_dir: str, tokenizer_path: str, mixture: Optional[str] = None) -> list[str]:
    """Register the tasks and mixtures for this TFDS data_dir and tokenizer; returns the mixture names.

    `mixture`, when it names a subset ablation (lima_SOURCE_nN_seedS), is registered too.
    """
    lima_dataset.check_built(data_dir)
    data_dir, tokenizer_path = os.path.abspath(data_dir), os.path.abspath(tokenizer_path)
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: no sentencepiece model")
    key = (data_dir, tokenizer_path)
    counts = {s: len(v) for s, v in _train_lines(data_dir).items()}
    for source in SOURCES:
        _add_task(task_name(source), key, [keep_source(source)], tokenizer_path, data_dir)
    names = [MIXTURE_1K, MIXTURE_DIALOGUE]
    _add_mixture(MIXTURE_1K, key, [(task_name(s), counts[s]) for s in SINGLE_TURN_SOURCES])
    _add_mixture(MIXTURE_DIALOGUE, key, [(task_name(s), counts[s]) for s in SOURCES])
    for source in SOURCES:
        names.append(only_mixture_name(source))
        _add_mixture(names[-1], key, [(task_name(source), counts[source])])
    match = _SUBSET.match(mixture or "")
    if match and match["source"] in SOURCES:
        source, n, seed = match["source"], int(match["n"]), int(match["seed"])
        lines = subset_lines(data_dir, source, n, seed)
        sub_task = f"{task_name(source)}_subset_n{n}_seed{seed}"
        _add_task(sub_task, key, [keep_source(source), keep_indices(lines)], tokenizer_path, data_dir)
        _add_mixture(mixture, key, [(sub_task, n)])
        names.append(mixture)
    if mixture is not None and mixture not in names:
        raise ValueError(f"unknown mixture {mixture!r}; expected one of {', '.join(names)} "
                         f"or lima_SOURCE_nN_seedS")
    return names


def mixture_task_names(mixture: str) -> list[str]:
    """The tasks of a registered mixture, in a fixed order."""
    return [t.name for t in seqio.get_mixture_or_task(mixture).tasks]


def load_examples(mixture: str, split: str = "train", max_len: Optional[int] = None) -> list[dict]:
    """Every example of a registered mixture once, tokenised: {source, index, targets, loss_mask}.

    Order: the mixture's tasks in turn, each by line number. `max_len` truncates on the right (seqio
    trims); None keeps full lengths (for stats).
    """
    lengths = None if max_len is None else {"targets": max_len, "loss_mask": max_len}
    out = []
    for name in mixture_task_names(mixture):
        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=False, num_epochs=1,
                              trim_output_features=max_len is not None)
        rows = [{"source": ex["source"].decode("utf-8"), "index": int(ex["index"]),
                 "targets": ex["targets"].astype(np.int32), "loss_mask": ex["loss_mask"].astype(np.int32)}
                for ex in ds.as_numpy_iterator()]
        out += sorted(rows, key=lambda r: r["index"])
    return out


def to_model_features(examples: list[dict], max_len: int, pack: bool = False) -> dict[str, np.ndarray]:
    """Run materialised examples through LimaFeatureConverter; {feature: [rows, max_len] array}."""
    def gen():
        for ex in examples:
            yield {"targets": ex["targets"][:max_len], "loss_mask": ex["loss_mask"][:max_len]}
    spec = {k: tf.TensorSpec([None], tf.int32) for k in ("targets", "loss_mask")}
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = LimaFeatureConverter(pack=pack)(ds, {"targets": max_len, "loss_mask": max_len})
    rows = list(ds.as_numpy_iterator())
    names = list(LimaFeatureConverter.MODEL_FEATURES) + (
        list(LimaFeatureConverter.PACKING_FEATURE_DTYPES) if pack else [])
    if not rows:
        return {k: np.zeros((0, max_len), np.int32) for k in names}
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in names}
