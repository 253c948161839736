"""Checkpoint conversion: Hugging Face folder ⇄ this project's converted checkpoint (Orbax).

hf_to_orbax writes OUT/lima_config.json, OUT/params/ (an Orbax PyTree checkpoint of our parameter
tree, readable by checkpoint.restore_params) and OUT/tokenizer.model when the source has one.
orbax_to_hf writes safetensors shards + model.safetensors.index.json, config.json,
generation_config.json and tokenizer files. Both stream: one of our parameters (a stacked layer
array at most) plus one HF tensor is in memory at a time. Outputs are built under a temporary
sibling name and renamed into place on success, so a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import Callable, Optional

import ml_dtypes
import numpy as np

from lima_jax import hf_io, model_dir
from lima_jax.checkpoint import PARAMS_DIR, checkpoint_kind
from lima_jax.config import CONFIG_FILE, LlamaConfig
from lima_jax.safetensors_io import write_safetensors_lazy
from lima_jax.chat_format import HF_CHAT_TEMPLATE
from lima_jax.tokenizer import EOT_PIECE, TOKENIZER_FILE, eot_id_for

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
INDEX_FILE = "model.safetensors.index.json"


def dtype_name(dtype) -> str:
    for name, d in DTYPES.items():
        if np.dtype(dtype) == d:
            return name
    raise ValueError(f"dtype {np.dtype(dtype)} is not supported; expected one of {sorted(DTYPES)}")


def _dtype(name: Optional[str]) -> Optional[np.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---- atomic output folders ----------------------------------------------------------------------
def check_output(out_dir: str, overwrite: bool) -> None:
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out_dir)}: output already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool = False):
    """Yields a fresh temporary folder next to `out_dir`; renamed to `out_dir` when the block
    succeeds, removed when it fails. An existing `out_dir` is an error unless `overwrite`."""
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: parent folder of the output does not exist")
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(out_dir):  # overwrite: move the old one aside first, drop it after the swap
            old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- Orbax, streamed ----------------------------------------------------------------------------
class LazyArray:
    """A parameter that is produced only when Orbax writes it (so one is in memory at a time)."""

    def __init__(self, shape, dtype, produce: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.produce = tuple(shape), np.dtype(dtype), produce

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def _streaming_registry():
    """Orbax's default type handlers plus one that writes LazyArrays one after another. It records
    them as 'np.ndarray', so the result is an ordinary checkpoint for any Orbax reader."""
    from orbax.checkpoint import type_handlers
    from orbax.checkpoint._src.serialization.type_handler_registry import _DEFAULT_TYPE_HANDLERS

    class StreamingNumpyHandler(type_handlers.NumpyHandler):
        def __init__(self):
            # The stock handler deep-copies every array up front (2× the model); we hold none.
            super().__init__(deepcopy_host_arrays=False)

        async def _background_serialize(self, values, infos, args=None):
            args = args or [None] * len(values)
            for value, info, arg in zip(values, infos, args):
                array = value.produce()
                if array.shape != value.shape or array.dtype != value.dtype:
                    raise ValueError(f"parameter {info.name}: produced {array.shape} {array.dtype}, "
                                     f"expected {value.shape} {value.dtype}")
                await super()._background_serialize([array], [info], [arg])
                del array

    return type_handlers.create_type_handler_registry(
        *_DEFAULT_TYPE_HANDLERS, (LazyArray, StreamingNumpyHandler()))


def save_params_streaming(directory: str, flat: dict[tuple[str, ...], LazyArray]) -> None:
    """Writes {path: LazyArray} as an Orbax checkpoint at `directory` (which must not exist)."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_streaming_registry(), use_compression=False)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(hf_io.unflatten(flat)))


class OrbaxParams:
    """Reads one parameter at a time from a params/ folder (Orbax partial restore)."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self._ocp = ocp
        self._ckptr = ocp.PyTreeCheckpointer()
        meta = self._ckptr.metadata(self.directory)
        meta = getattr(meta, "item_metadata", meta)
        self.meta = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in hf_io.flatten(dict(meta)).items()}

    def get(self, path: tuple[str, ...]) -> np.ndarray:
        ocp = self._ocp
        item = hf_io.unflatten({path: 0})
        restore_args = hf_io.unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray)})
        tree = self._ckptr.restore(self.directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        return hf_io.flatten(tree)[path]

    def close(self):
        self._ckptr.close()


# ---- HF → Orbax ---------------------------------------------------------------------------------
def _extend_vocab(array: np.ndarray, axis: int, rows: int, total: int, mean_rows: int) -> np.ndarray:
    """`array` with `rows` real rows along `axis`, grown to `total`: the next `mean_rows` rows are the
    mean of the real ones (computed in float32, stored in the array's dtype), the rest zero."""
    if array.shape[axis] == total:
        return array
    shape = list(array.shape)
    shape[axis] = total
    out = np.zeros(shape, array.dtype)
    index = [slice(None)] * array.ndim
    index[axis] = slice(0, rows)
    out[tuple(index)] = array[tuple(index)]
    if mean_rows:
        mean = np.mean(array[tuple(index)], axis=axis, dtype=np.float32, keepdims=True).astype(array.dtype)
        index[axis] = slice(rows, rows + mean_rows)
        out[tuple(index)] = mean
    return out


def hf_to_orbax(hf_dir: str, out_dir: str, dtype: Optional[str] = None, add_eot: bool = False,
                vocab_padding_multiple: int = 1, overwrite: bool = False,
                log: Callable[[str], None] = lambda s: None) -> LlamaConfig:
    """Converts an HF LLaMA folder; returns the written config. dtype None keeps the stored dtype."""
    np_dtype = _dtype(dtype)
    check_output(out_dir, overwrite)  # before any reading
    hf_dir = os.path.abspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    source = hf_io.read_hf_config(hf_dir)
    if vocab_padding_multiple < 1:
        raise ValueError(f"vocab_padding_multiple must be >= 1, got {vocab_padding_multiple}")
    index = hf_io.TensorIndex(hf_dir)
    hf_io.check_hf_tensors(index, source)  # headers only: a bad checkpoint fails before any output
    stored = {index.dtype(n) for n, _, _ in hf_io.iter_entries(source)}
    tokenizer = os.path.join(hf_dir, TOKENIZER_FILE)
    config = source.replace(vocab_padding_multiple=vocab_padding_multiple)
    if add_eot:
        if source.eot_token_id is not None:
            raise ValueError(f"{hf_dir}/config.json: already has eot_token_id={source.eot_token_id}")
        eot = eot_id_for(_sp_vocab_size(tokenizer) if os.path.exists(tokenizer) else source.vocab_size)
        if eot != source.vocab_size:
            raise ValueError(f"{tokenizer}: has {eot} pieces but config.json says vocab_size={source.vocab_size}")
        config = config.replace(vocab_size=source.vocab_size + 1, eot_token_id=eot)
    if dtype is None:  # record the stored dtype (loading casts to what the caller asks for anyway)
        names = [n for n, d in DTYPES.items() if len(stored) == 1 and d in stored]
        dtype_recorded = names[0] if names else "float32"
    else:
        dtype_recorded = dtype
    config = config.replace(param_dtype=dtype_recorded)

    def produce(path):
        def read():
            log(f"reading {'/'.join(path)}")
            array = hf_io.read_hf_param(index, source, path, np_dtype)
            if path in hf_io.VOCAB_AXIS:
                array = _extend_vocab(array, hf_io.VOCAB_AXIS[path], source.vocab_size, config.padded_vocab_size,
                                      int(add_eot))
            return array
        return read

    flat = {}
    for path, shape in hf_io.our_shapes(config).items():
        entry = hf_io.ENTRIES_BY_PATH[path]
        first = entry.hf_name.format(i=0)
        array_dtype = np_dtype if np_dtype is not None else index.dtype(first)
        flat[path] = LazyArray(shape, array_dtype, produce(path))

    with staged_output(out_dir, overwrite) as tmp:
        config.save_json(os.path.join(tmp, CONFIG_FILE))
        save_params_streaming(os.path.join(tmp, PARAMS_DIR), flat)
        if os.path.exists(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
    log(f"wrote {out_dir}")
    return config


def _sp_vocab_size(path: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path).get_piece_size()


# ---- Orbax / model_dir → HF ---------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """'5GB' → 5e9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected a size such as 5GB, 500MB or 20KB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def _load_source(ckpt_dir: str, step: Optional[int]):
    """(config, get(path) -> array, {path: (shape, dtype)}, close) for a converted checkpoint or a
    training model_dir."""
    kind = checkpoint_kind(ckpt_dir)
    if kind == "converted":
        if step is not None:
            raise ValueError(f"{ckpt_dir}: --step applies to a training model_dir, this is a converted checkpoint")
        config = LlamaConfig.load_json(os.path.join(ckpt_dir, CONFIG_FILE))
        params = OrbaxParams(os.path.join(ckpt_dir, PARAMS_DIR))
        shapes = hf_io.our_shapes(config)
        for path, shape in shapes.items():
            if path not in params.meta:
                raise ValueError(f"{params.directory}: checkpoint lacks parameter {'/'.join(path)}")
            if params.meta[path][0] != shape:
                raise ValueError(f"{params.directory}: parameter {'/'.join(path)} has shape "
                                 f"{params.meta[path][0]}, {CONFIG_FILE} implies {shape}")
        return config, params.get, params.meta, params.close
    if kind == "model_dir":
        config, tree = model_dir.restore_params(ckpt_dir, step=step)
        flat = {p: np.asarray(a) for p, a in hf_io.flatten(dict(tree)).items()}
        return config, flat.__getitem__, {p: (a.shape, a.dtype) for p, a in flat.items()}, lambda: None
    raise ValueError(f"{ckpt_dir}: is a Hugging Face folder already; expected a converted checkpoint "
                     f"({CONFIG_FILE} + {PARAMS_DIR}/) or a training model_dir")


def orbax_to_hf(ckpt_dir: str, out_dir: str, step: Optional[int] = None, max_shard_size="5GB",
                dtype: Optional[str] = None, overwrite: bool = False,
                log: Callable[[str], None] = lambda s: None) -> LlamaConfig:
    """Exports a converted checkpoint or a training model_dir as an HF LLaMA folder."""
    np_dtype = _dtype(dtype)
    limit = parse_size(max_shard_size)
    check_output(out_dir, overwrite)  # before any reading
    ckpt_dir = os.path.abspath(ckpt_dir)
    config, get, meta, close = _load_source(ckpt_dir, step)
    try:
        out_dtypes = {np_dtype if np_dtype is not None else meta[p][1] for p in hf_io.our_shapes(config)}
        torch_dtype = dtype_name(out_dtypes.pop()) if len(out_dtypes) == 1 else "float32"
        specs = _hf_specs(config, get, np_dtype, meta)
        with staged_output(out_dir, overwrite) as tmp:
            _write_shards(tmp, specs, limit, log)
            _write_json(os.path.join(tmp, "config.json"), config.to_hf_dict(torch_dtype))
            _write_json(os.path.join(tmp, "generation_config.json"), generation_config(config))
            tokenizer = os.path.join(ckpt_dir, TOKENIZER_FILE)
            if os.path.exists(tokenizer):
                write_tokenizer_files(tmp, tokenizer, config)
    finally:
        close()
    log(f"wrote {out_dir}")
    return config


def _hf_specs(config: LlamaConfig, get, np_dtype, meta) -> list:
    """[(hf_name, shape, dtype, thunk)], grouped by our parameter so each is read once."""
    cache: dict = {}

    def our_param(path):
        if path not in cache:
            cache.clear()  # keep one parameter in memory
            cache[path] = get(path)
        return cache[path]

    def thunk(entry, layer, out_dtype):
        def produce():
            array = our_param(entry.path)
            tensor = hf_io.hf_tensor(entry, config, array if layer is None else array[layer])
            return tensor.astype(out_dtype, copy=False)
        return produce

    by_param: dict = {}
    for hf_name, entry, layer in hf_io.iter_entries(config):
        by_param.setdefault(entry.path, []).append((hf_name, entry, layer))
    specs = []
    for path, items in by_param.items():
        out_dtype = np_dtype if np_dtype is not None else meta[path][1]
        for hf_name, entry, layer in items:
            shape = hf_io.hf_shape(entry, hf_io.unpadded_slice_shape(config, path))
            specs.append((hf_name, shape, out_dtype, thunk(entry, layer, out_dtype)))
    return specs


def _write_shards(folder: str, specs: list, limit: int, log) -> None:
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * np.dtype(spec[2]).itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        log(f"writing {name} ({len(shard)} tensors)")
        write_safetensors_lazy(os.path.join(folder, name), shard, metadata={"format": "pt"})
        for spec in shard:
            weight_map[spec[0]] = name
            total += int(np.prod(spec[1])) * np.dtype(spec[2]).itemsize
    _write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


def generation_config(config: LlamaConfig) -> dict:
    """Stops on EOS and <eot> (LIMA's end of turn); a model with <eot> samples as the paper does
    (nucleus 0.9, temperature 0.7, repetition penalty 1.2: what lima-decode uses)."""
    eos = [config.eos_token_id] + ([config.eot_token_id] if config.eot_token_id is not None else [])
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    if config.eot_token_id is not None:
        out.update(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    return out


def write_tokenizer_files(folder: str, tokenizer_model: str, config: LlamaConfig) -> None:
    """tokenizer.model plus a tokenizer_config.json that declares <eot> (when the model has one) as a
    special added token, with LIMA's chat template (chat_format.HF_CHAT_TEMPLATE). No tokenizer_class: with one, transformers 5 picks LlamaTokenizer, whose ids
    differ from sentencepiece's; without, AutoTokenizer reads tokenizer.model and matches it."""
    shutil.copyfile(tokenizer_model, os.path.join(folder, TOKENIZER_FILE))
    tok_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "model_max_length": config.max_position_embeddings}
    if config.eot_token_id is not None:
        tok_config["added_tokens_decoder"] = {str(config.eot_token_id): {
            "content": EOT_PIECE, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}}
        tok_config["additional_special_tokens"] = [EOT_PIECE]
        tok_config["chat_template"] = HF_CHAT_TEMPLATE
    _write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ---- verify: HF vs ours on random tokens --------------------------------------------------------
def verify(hf_dir: str, ckpt_dir: str, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    """Runs transformers' LlamaForCausalLM (HF_DIR) and our load_pretrained (CKPT_DIR) in float32 on
    random tokens. Returns max_abs_diff and mean KL(hf || ours) over the vocabulary both share (a
    checkpoint with an added EOT has one row more than its HF source)."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError(f"verify needs torch and transformers (pip install lima-jax[test]): {e}") from None
    from lima_jax.checkpoint import load_pretrained

    hf_config = hf_io.read_hf_config(os.path.abspath(hf_dir))
    ours = load_pretrained(ckpt_dir, dtype="float32")
    vocab = min(hf_config.vocab_size, ours.config.vocab_size)
    length = min(length, hf_config.max_position_embeddings)
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(batch, length))
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.float().numpy()[..., :vocab]
    got = ours.logits(tokens)[..., :vocab]
    diff = float(np.max(np.abs(ref.astype(np.float64) - got)))
    log_p, log_q = _log_softmax(ref), _log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return {"max_abs_diff": diff, "kl": kl, "batch": batch, "length": length, "vocab": vocab}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
