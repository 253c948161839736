"""Where weights come from: HF folders, this project's converted checkpoints, training model_dirs.

A converted checkpoint (written by `lima-convert hf-to-orbax`) is a folder with
    lima_config.json   the LlamaConfig (JSON)
    params/            an Orbax checkpoint of our parameter tree
    tokenizer.model    when the source had one
A training model_dir holds `checkpoints/<step>/` written by an Orbax CheckpointManager (model_dir.py).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

from lima_jax import hf_io, model_dir
from lima_jax.config import CONFIG_FILE, LlamaConfig
from lima_jax.language_model import LanguageModel, build_model

PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16")


def checkpoint_kind(path: str) -> str:
    """'hf', 'converted' or 'model_dir'; a clear error otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return "converted"
    if os.path.isdir(os.path.join(path, model_dir.CHECKPOINTS)):
        return "model_dir"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"{path}: not a Hugging Face folder (config.json), a converted checkpoint "
                     f"({CONFIG_FILE} + {PARAMS_DIR}/) or a training model_dir (checkpoints/)")


def load_pretrained(path: str, dtype: str = "float32", mesh: Optional[Mesh] = None) -> LanguageModel:
    """Loads a model for inference.

    path: a Hugging Face folder (config.json + model.safetensors, or sharded with
    model.safetensors.index.json), a checkpoint written by `lima-convert`, or a training model_dir
    (its latest checkpoint). dtype: "float32" or "bfloat16", for both storage and compute.
    mesh: place parameters on this mesh by the logical-axis rules (None: the default device).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = os.path.abspath(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        config = hf_io.read_hf_config(path, dtype=dtype, param_dtype=dtype)
        params = hf_io.read_hf_params(path, config)
    elif kind == "converted":
        config, params = restore_converted(path)
        config = config.replace(dtype=dtype, param_dtype=dtype)
    else:
        config, params = model_dir.restore_params(path)
        config = config.replace(dtype=dtype, param_dtype=dtype, residual_dropout=0.0)
    return LanguageModel(config, build_model(config, params, mesh), mesh)


# ---- converted checkpoints (Orbax) -------------------------------------------------------------
def save_params(directory: str, params: dict) -> None:
    """Writes a parameter tree with Orbax at `directory` (which must not exist)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), params)
        ckptr.wait_until_finished()


def restore_params(directory: str, config: LlamaConfig) -> dict:
    """Our parameter tree as numpy arrays from an Orbax checkpoint written by `save_params`."""
    import orbax.checkpoint as ocp

    shapes = hf_io.our_shapes(config)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.abspath(directory))
        tree = getattr(meta, "item_metadata", meta)
        flat_meta = hf_io.flatten(dict(tree))
        missing = set(shapes) - set(flat_meta)
        if missing:
            raise ValueError(f"{directory}: checkpoint lacks parameter {'/'.join(sorted(missing)[0])}")
        target = hf_io.unflatten({p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for p, m in flat_meta.items()})
        restored = ckptr.restore(os.path.abspath(directory), target)
    return jax.tree.map(np.asarray, restored)


def require_converted(path: str) -> None:
    """A clear error unless `path` is a converted checkpoint (what lima-train's INIT_CHECKPOINT must be)."""
    if checkpoint_kind(path) != "converted":
        raise ValueError(f"{path}: not a converted checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/); "
                         f"convert Hugging Face weights with `lima-convert hf-to-orbax` first")


def restore_converted_params(path: str, target: dict) -> dict:
    """A converted checkpoint's parameters restored into `target`'s shapes and shardings (each host
    reads only its shards)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), target)


def restore_converted(path: str) -> tuple[LlamaConfig, dict]:
    config = LlamaConfig.load_json(os.path.join(path, CONFIG_FILE))
    return config, restore_params(os.path.join(path, PARAMS_DIR), config)
