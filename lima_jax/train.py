"""The lima-train loop: LIMA supervised fine-tuning (§3) on any mesh, resumable bit for bit.

`train(model_dir)` builds the mesh, the input and the compiled step (train_step.py) from the parsed
gin recipe (recipe.py), resumes from model_dir's latest checkpoint if there is one (model_dir.py),
and runs to the recipe's last step: a checkpoint at every epoch's end, on SIGTERM (preemption) and at
the end; TensorBoard scalars every `log_every` steps. The command line is lima_jax/cli/train.py.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import time
from typing import Optional

import gin
import jax
import numpy as np

from lima_jax import checkpoint, mesh as mesh_lib, model_dir as model_dir_lib
from lima_jax.atomic import atomic_write_text
from lima_jax.config import CONFIG_FILE, LlamaConfig
from lima_jax.recipe import model_config, recipe
from lima_jax.train_metrics import ScalarWriter, memory_report, peak_flops_per_device
from lima_jax.train_step import BATCH_KEYS, TrainState, abstract_batch, batch_sharding, build_train_step, \
    init_state, model_flops_per_step


def _save(mngr, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
    model_dir_lib.save(mngr, step, state.params, {"step": state.step, "opt_state": state.opt_state,
                                                  "rng": state.rng}, data_state, meta)


def _restore(mngr, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    rest = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    params, s, data_state = model_dir_lib.restore(mngr, step, abstract.params, rest)
    return TrainState(s["step"], params, s["opt_state"], s["rng"]), data_state


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# What the last line says of the steps this invocation ran: real_tokens are the non-padding tokens fed
# to the model, computed_tokens rows × max_len; train_s excludes compiling (compile_s).
SUMMARY_KEYS = ("steps", "examples", "real_tokens", "computed_tokens", "train_s", "compile_s")


class _Preempted:
    """SIGTERM (preemption) sets a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.flag = False

    def __call__(self, signum, frame):
        self.flag = True


@gin.configurable
def train(model_dir: str, *, mixture: str = gin.REQUIRED, data_dir: Optional[str] = None,
          tokenizer_path: Optional[str] = None, init_checkpoint: Optional[str] = None,
          input_class: str = "data_pipeline.inputs.TrainInput", peak_flops: Optional[float] = None,
          checkpoint_every_epoch: bool = True, log_every: int = 1, packing: bool = False) -> dict:
    """Trains (or resumes, from the latest checkpoint in model_dir) and returns the last step's
    metrics; {} when model_dir's run had already reached its last step. packing: each step's examples
    packed into as few rows as a bucket allows (data_pipeline/packing.py), one compile per bucket.
    The last line printed is `summary: {json}` of this invocation's steps (also to TensorBoard)."""
    r = recipe()
    mesh = mesh_lib.make_mesh()
    rules, fsdp_axes = mesh_lib.logical_rules()
    base = None
    if init_checkpoint:
        try:
            checkpoint.require_converted(init_checkpoint)
        except (OSError, ValueError) as e:
            raise type(e)(f"INIT_CHECKPOINT {e}") from None
        base = LlamaConfig.load_json(os.path.join(init_checkpoint, CONFIG_FILE))
    config = model_config(base=base, platform=mesh.devices.flat[0].platform)
    primary = jax.process_index() == 0

    b_shard = batch_sharding(mesh, rules)
    shard_index, num_shards = mesh_lib.host_block(b_shard, r.batch_size)
    # Packed row counts split evenly over the batch's devices and the microbatches.
    row_multiple = mesh_lib.batch_shards(b_shard) * r.grad_accum_steps
    data = _import(input_class)(mixture=mixture, data_dir=data_dir, tokenizer_path=tokenizer_path,
                                global_batch_size=r.batch_size, max_len=r.max_len, seed=r.seed,
                                shard_index=shard_index, num_shards=num_shards, split="train",
                                packing=packing, row_multiple=row_multiple)
    steps_per_epoch = int(data.steps_per_epoch)
    total_steps = r.num_epochs * steps_per_epoch
    done = model_dir_lib.list_checkpoint_steps(model_dir)
    if done and done[-1] >= total_steps:
        print(f"{model_dir}: the run is already finished (checkpoint at step {done[-1]} of {total_steps}); "
              f"nothing to do", flush=True)
        print("summary: " + json.dumps(dict.fromkeys(SUMMARY_KEYS, 0)), flush=True)
        return {}
    ts = build_train_step(config, r, mesh, rules, fsdp_axes, total_steps)

    os.makedirs(model_dir, exist_ok=True)
    if primary:
        # The attention kernel is left to whoever loads the model (None: by their platform), so a model
        # trained on TPU ("splash") does not run the kernel in interpret mode when evaluated on a CPU.
        saved = config.replace(attention_kernel=None)
        atomic_write_text(os.path.join(model_dir, CONFIG_FILE), json.dumps(saved.to_dict(), indent=2, sort_keys=True))
    mngr = model_dir_lib.manager(model_dir)
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = _restore(mngr, latest, ts.abstract_state)
        data.set_state(data_state)
        print(f"resumed from {model_dir}/{model_dir_lib.CHECKPOINTS}/{latest}", flush=True)
    else:
        state = init_state(config, ts, r.seed, init_checkpoint)
    step = int(state.step)

    summary = dict.fromkeys(SUMMARY_KEYS, 0.0)
    programs: dict = {}  # global rows -> the compiled step for batches of that many rows

    def program(rows: int):
        if rows not in programs:
            t = time.perf_counter()
            programs[rows] = ts.fn.lower(ts.abstract_state, abstract_batch(rows, r.max_len, mesh, rules)).compile()
            summary["compile_s"] += time.perf_counter() - t
            print(f"compiled the step for {rows} rows; " + memory_report(programs[rows]), flush=True)
        return programs[rows]

    print(f"mesh {dict(mesh.shape)}; {config.num_params():,} parameters; {steps_per_epoch} steps/epoch × "
          f"{r.num_epochs} epochs = {total_steps} steps; batch {r.batch_size} × {r.max_len}", flush=True)
    if packing:
        print(f"packing: rows per step from buckets {data.buckets} (padded: {r.batch_size})", flush=True)
    if primary:
        atomic_write_text(os.path.join(model_dir, model_dir_lib.OPERATIVE_CONFIG), gin.operative_config_str())

    peak = (peak_flops or peak_flops_per_device() or 0.0) * jax.device_count()
    writer = ScalarWriter(os.path.join(model_dir, model_dir_lib.TENSORBOARD)) if primary else None
    preempted = _Preempted()
    old_handler = signal.signal(signal.SIGTERM, preempted)
    bar = None
    if primary:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)
    last: dict = {}
    it = iter(data)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            try:
                local = next(it)
            except StopIteration:  # an input that iterates one epoch at a time
                it = iter(data)
                local = next(it)
            rows = len(local["decoder_input_tokens"]) * num_shards
            batch = {k: jax.make_array_from_process_local_data(ts.batch_sharding, np.asarray(local[k], d),
                                                               (rows, r.max_len))
                     for k, d in BATCH_KEYS.items()}
            compiled = program(rows)
            t_step = time.perf_counter()
            new_state, metrics = compiled(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            summary["train_s"] += time.perf_counter() - t_step
            if not math.isfinite(metrics["loss"]):
                good = model_dir_lib.list_checkpoint_steps(model_dir)
                raise FloatingPointError(
                    f"loss is {metrics['loss']} at step {step + 1}; stopped without saving; last good "
                    f"checkpoint: {f'{model_dir}/{model_dir_lib.CHECKPOINTS}/{good[-1]}' if good else 'none'}")
            state, step = new_state, step + 1
            dt = time.perf_counter() - t0
            metrics.update(step_time_s=dt, tokens_per_s=metrics["real_tokens"] / dt, rows=rows)
            if peak:
                metrics["mfu"] = model_flops_per_step(config, rows, r.max_len) / dt / peak
            for key, value in (("steps", 1), ("examples", metrics["examples"]),
                               ("real_tokens", metrics["real_tokens"]), ("computed_tokens", rows * r.max_len)):
                summary[key] += value
            last = metrics
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                                lr=f"{metrics['lr']:.2e}")
            if writer is not None and step % log_every == 0:
                writer.write(step, metrics)
            end_of_epoch = step % steps_per_epoch == 0
            stop = preempted.flag or mngr.reached_preemption(step)
            if (end_of_epoch and checkpoint_every_epoch) or stop or step == total_steps:
                meta = {"step": step, "epoch": step // steps_per_epoch, "end_of_epoch": end_of_epoch,
                        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
                _save(mngr, step, state, data.get_state(), meta)
            if stop:
                print(f"SIGTERM: saved step {step}; rerun the same command to resume", flush=True)
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        signal.signal(signal.SIGTERM, old_handler)
        if bar is not None:
            bar.close()
        if writer is not None:
            if summary["steps"]:
                writer.write(step, {f"summary/{k}": v for k, v in summary.items()})
            writer.close()
    summary = {k: (round(v, 3) if k.endswith("_s") else int(v)) for k, v in summary.items()}
    print("summary: " + json.dumps(summary), flush=True)
    return last
