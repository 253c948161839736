"""A training model_dir: its layout, and reading and writing it (Orbax). lima-train writes it;
lima-convert, lima-decode (epoch sweeps) and `load_pretrained` read it.

    lima_config.json        the LlamaConfig trained (architecture + training dtypes)
    operative_config.gin    every gin value the run used
    checkpoints/<step>/     Orbax: params, state (step, opt_state, rng), data (iterator state), meta
    tensorboard/            event files (loss, accuracy, lr, grad_norm, tokens_per_s, step_time_s, mfu)

Epochs map to steps as step = epoch * steps_per_epoch; each checkpoint's `meta` item records
{"step", "epoch", "end_of_epoch", "steps_per_epoch", "total_steps"} (see `epoch_steps`).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from lima_jax.config import CONFIG_FILE, LlamaConfig
from lima_jax.model import abstract_params

OPERATIVE_CONFIG = "operative_config.gin"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
ITEMS = ("params", "state", "data", "meta")


def manager(model_dir: str, read_only: bool = False):
    """The Orbax CheckpointManager of model_dir/checkpoints (async saves when writing)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(model_dir, CHECKPOINTS)), options=options,
                                 item_names=ITEMS)


def list_checkpoint_steps(model_dir: str) -> list[int]:
    """Steps of the finished checkpoints under model_dir/checkpoints (Orbax renames a step's folder to
    its bare number only when it is complete)."""
    root = os.path.join(model_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def checkpoint_meta(model_dir: str, step: int) -> dict:
    with open(os.path.join(model_dir, CHECKPOINTS, str(step), "meta", "metadata"), encoding="utf-8") as f:
        return json.load(f)


def epoch_steps(model_dir: str) -> dict[int, int]:
    """{epoch: step} for the end-of-epoch checkpoints (a SIGTERM checkpoint mid-epoch is not one)."""
    out = {}
    for step in list_checkpoint_steps(model_dir):
        meta = checkpoint_meta(model_dir, step)
        if meta.get("end_of_epoch"):
            out[int(meta["epoch"])] = step
    return out


def restore_params(model_dir: str, step: Optional[int] = None) -> tuple[LlamaConfig, dict]:
    """(config, params as numpy) from a training model_dir: the latest checkpoint, or `step`."""
    steps = list_checkpoint_steps(model_dir)
    if not steps:
        raise FileNotFoundError(f"{model_dir}: no finished checkpoint under {CHECKPOINTS}/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{model_dir}: no checkpoint for step {step}; steps present: {steps}")
    config = LlamaConfig.load_json(os.path.join(model_dir, CONFIG_FILE))
    import orbax.checkpoint as ocp

    # Saved from any mesh; restored whole onto this process's first device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params(config))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.abspath(os.path.join(model_dir, CHECKPOINTS, str(step), "params")), target)
    return config, jax.tree.map(np.asarray, params)


def save(mngr, step: int, params, state: dict, data_state: dict, meta: dict) -> None:
    """One checkpoint: params and state ({step, opt_state, rng}) as arrays, data and meta as JSON."""
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr, step: int, abstract_params_tree, abstract_state: dict) -> tuple[dict, dict, dict]:
    """(params, state, data state) of checkpoint `step`, into the shardings of the abstract trees."""
    import orbax.checkpoint as ocp

    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params_tree), state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return out["params"], out["state"], out["data"]
