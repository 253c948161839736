"""The HF ⇄ lima-jax parameter name map and its per-tensor transforms; reading an HF folder.

One table says which HF tensor is which of ours. Every transform is "copy" or "transposed":
ours = hf.T.reshape(our_shape) and hf = ours.reshape(hf_shape[::-1]).T, e.g. q_proj.weight
[heads*head_dim, embed] ⇄ q_proj [embed, heads, head_dim]. Both directions read the same table,
so a round trip is bit-exact by construction (and tested). Our embedding and LM head carry
config.padded_vocab_size rows; the padding rows are zero on read and trimmed on write.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple, Optional

import numpy as np

from lima_jax.config import LlamaConfig
from lima_jax.safetensors_io import SafetensorsFile, iter_checkpoint_files


class Entry(NamedTuple):
    hf_name: str  # with "{i}" for the layer index
    path: tuple[str, ...]  # our parameter path; stacked on a leading layer axis when per-layer
    transposed: bool


GLOBAL_ENTRIES = (
    Entry("model.embed_tokens.weight", ("embed",), False),
    Entry("model.norm.weight", ("final_norm", "scale"), False),
    Entry("lm_head.weight", ("lm_head",), True),
)
LAYER_ENTRIES = (
    Entry("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm", "scale"), False),
    Entry("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_proj"), True),
    Entry("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_proj"), True),
    Entry("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_proj"), True),
    Entry("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_proj"), True),
    Entry("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), False),
    Entry("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), True),
    Entry("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj"), True),
    Entry("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj"), True),
)
# Buffers some exports carry that hold no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


ENTRIES_BY_PATH = {entry.path: entry for entry in GLOBAL_ENTRIES + LAYER_ENTRIES}
# Which axis of ours indexes the vocabulary: ours have config.padded_vocab_size rows there, HF's
# have config.vocab_size (padding rows are zero and never leave this project).
VOCAB_AXIS = {("embed",): 0, ("lm_head",): 1}


def our_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of each of our parameters (stacked per-layer ones include the layer axis)."""
    e, f, v, l = config.hidden_size, config.intermediate_size, config.padded_vocab_size, config.num_layers
    h, kvh, d = config.num_heads, config.num_kv_heads, config.head_dim
    shapes = {
        ("embed",): (v, e),
        ("final_norm", "scale"): (e,),
        ("layers", "input_norm", "scale"): (l, e),
        ("layers", "attn", "q_proj"): (l, e, h, d),
        ("layers", "attn", "k_proj"): (l, e, kvh, d),
        ("layers", "attn", "v_proj"): (l, e, kvh, d),
        ("layers", "attn", "o_proj"): (l, h, d, e),
        ("layers", "post_attn_norm", "scale"): (l, e),
        ("layers", "mlp", "gate_proj"): (l, e, f),
        ("layers", "mlp", "up_proj"): (l, e, f),
        ("layers", "mlp", "down_proj"): (l, f, e),
    }
    if not config.tie_word_embeddings:
        shapes[("lm_head",)] = (e, v)
    return shapes


def unpadded_slice_shape(config: LlamaConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """Our shape of one HF tensor's worth of `path`: without the layer axis and vocabulary padding."""
    shape = list(our_shapes(config)[path])
    if path[0] == "layers":
        shape = shape[1:]
    if path in VOCAB_AXIS:
        shape[VOCAB_AXIS[path]] = config.vocab_size
    return tuple(shape)


def hf_shape(entry: Entry, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for one (unstacked) slice of ours."""
    if not entry.transposed:
        return our_shape
    if entry.path[-1] in ("q_proj", "k_proj", "v_proj"):  # [embed, heads, head_dim] ⇄ [heads*head_dim, embed]
        return (our_shape[1] * our_shape[2], our_shape[0])
    if entry.path[-1] == "o_proj":  # [heads, head_dim, embed] ⇄ [embed, heads*head_dim]
        return (our_shape[2], our_shape[0] * our_shape[1])
    return our_shape[::-1]


def to_ours(entry: Entry, tensor: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    return tensor.T.reshape(our_shape) if entry.transposed else tensor


def to_hf(entry: Entry, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(array.reshape(shape[::-1]).T) if entry.transposed else array


def iter_entries(config: LlamaConfig) -> Iterator[tuple[str, Entry, Optional[int]]]:
    """(hf_name, entry, layer index or None) for every tensor the HF model has."""
    for entry in GLOBAL_ENTRIES:
        if entry.path == ("lm_head",) and config.tie_word_embeddings:
            continue
        yield entry.hf_name, entry, None
    for i in range(config.num_layers):
        for entry in LAYER_ENTRIES:
            yield entry.hf_name.format(i=i), entry, i


# ---- reading an HF folder ----------------------------------------------------------------------
def read_hf_config(hf_dir: str, **overrides) -> LlamaConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return LlamaConfig.from_hf_dict(hf, source=path, **overrides)


class TensorIndex:
    """Where each HF tensor lives across an HF folder's safetensors (or torch .bin) files."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.files: dict[str, object] = {}
        files = list(iter_checkpoint_files(hf_dir))
        if files:
            for path in files:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: listed in the safetensors index but missing")
                st = SafetensorsFile(path)
                for name in st.names():
                    self.files[name] = st
        else:
            self._index_torch_bins(hf_dir)
        if not self.files:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors, safetensors index or pytorch_model*.bin")

    def _index_torch_bins(self, hf_dir):
        bins = sorted(n for n in os.listdir(hf_dir) if n.startswith("pytorch_model") and n.endswith(".bin"))
        if not bins:
            return
        try:
            import torch
        except ImportError:
            raise RuntimeError(f"{hf_dir}: has only pytorch_model*.bin weights; install torch (the 'test' extra) "
                               "or convert them to safetensors") from None
        for name in bins:
            path = os.path.join(hf_dir, name)
            # weights_only: never unpickle arbitrary objects from a checkpoint.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            holder = _TorchFile(path, state)
            for key in state:
                self.files[key] = holder

    def names(self) -> list[str]:
        return list(self.files)

    def where(self, name: str) -> str:
        return self.files[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[name].shape(name))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.files[name].dtype(name))

    def read(self, name: str) -> np.ndarray:
        return self.files[name].read(name)


class _TorchFile:
    def __init__(self, path, state):
        self.path, self.state = path, state

    def shape(self, name):
        return tuple(self.state[name].shape)

    def dtype(self, name):
        return self.read(name).dtype  # a view of the memory-mapped tensor, not a copy

    def read(self, name):
        import torch
        t = self.state[name]
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def check_hf_tensors(index: TensorIndex, config: LlamaConfig) -> None:
    """Every tensor the config implies is present with the right shape, and nothing else is there;
    reads headers only, so a bad checkpoint fails before anything is written."""
    expected = set()
    for hf_name, entry, _ in iter_entries(config):
        expected.add(hf_name)
        if hf_name not in index.files:
            raise ValueError(f"{index.hf_dir}: tensor {hf_name!r} is missing from the checkpoint")
        want = hf_shape(entry, unpadded_slice_shape(config, entry.path))
        got = index.shape(hf_name)
        if got != want:
            raise ValueError(f"{index.where(hf_name)}: tensor {hf_name!r} has shape {got}, config implies {want}")
    unknown = [n for n in index.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
               and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unknown:
        raise ValueError(f"{index.where(unknown[0])}: unexpected tensor {unknown[0]!r} for this config "
                         f"({len(unknown)} unexpected in all)")


def read_hf_param(index: TensorIndex, config: LlamaConfig, path: tuple[str, ...], dtype=None) -> np.ndarray:
    """One of our parameters from HF tensors; a stacked layer array is filled slice by slice, so memory
    holds this array plus one HF tensor. Vocabulary padding rows are zero. dtype=None keeps the stored
    dtype. Shapes must have been checked (check_hf_tensors)."""
    entry = ENTRIES_BY_PATH[path]
    full_shape = our_shapes(config)[path]
    slice_shape = unpadded_slice_shape(config, path)
    out = None
    layers = range(config.num_layers) if path[0] == "layers" else [None]
    for layer in layers:
        tensor = index.read(entry.hf_name.format(i=layer))
        if dtype is not None:
            tensor = tensor.astype(dtype, copy=False)
        value = to_ours(entry, tensor, slice_shape)
        if layer is None and value.shape == full_shape:
            return np.ascontiguousarray(value)
        if out is None:
            out = np.zeros(full_shape, value.dtype)
        target = out if layer is None else out[layer]
        target[tuple(slice(0, n) for n in slice_shape)] = value
    return out


def read_hf_params(hf_dir: str, config: LlamaConfig, dtype=None, on_tensor=None) -> dict:
    """Our parameter tree (nested dict of numpy arrays) from an HF folder, one parameter at a time.
    dtype=None keeps each tensor's stored dtype. on_tensor(path) is called after each parameter."""
    index = TensorIndex(hf_dir)
    check_hf_tensors(index, config)
    out = {}
    for path in our_shapes(config):
        out[path] = read_hf_param(index, config, path, dtype)
        if on_tensor is not None:
            on_tensor(path)
    return unflatten(out)


def hf_tensor(entry: Entry, config: LlamaConfig, array: np.ndarray) -> np.ndarray:
    """The HF tensor of `array` (one layer's slice of ours, or a global parameter): vocabulary padding
    trimmed, then the table's transform reversed."""
    if entry.path in VOCAB_AXIS:
        index = [slice(None)] * array.ndim
        index[VOCAB_AXIS[entry.path]] = slice(0, config.vocab_size)
        array = array[tuple(index)]
    return to_hf(entry, array, hf_shape(entry, array.shape))


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat
