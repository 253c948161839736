"""lima-train: LIMA supervised fine-tuning (§3) on any mesh, resumable bit for bit.

    lima-train --gin_file=gin/models/llama_65b.gin --gin_file=gin/meshes/v4_256.gin \
               --gin_file=gin/runs/lima_sft.gin --gin_bindings="INIT_CHECKPOINT='gs://.../llama-65b'" \
               --model_dir=gs://.../run

The pieces, top to bottom: the recipe and model config (gin), the optimizer and its schedule, the
train state and its shardings, the loss, the train step (`build_train_step`, also compiled by
lima-aot), checkpoints, and the loop (`train`). model_dir layout:
    lima_config.json        the LlamaConfig trained (architecture + training dtypes)
    operative_config.gin    every gin value the run used
    checkpoints/<step>/     Orbax: params, state (step, opt_state, rng), data (iterator state), meta
    tensorboard/            event files (loss, accuracy, lr, grad_norm, tokens_per_s, step_time_s, mfu)
Epochs map to steps as step = epoch * steps_per_epoch; each checkpoint's `meta` item also records
{"step", "epoch", "end_of_epoch", "steps_per_epoch"} (see `epoch_steps`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
import time
from typing import Any, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import checkpoint, cpu_gemm, cpu_tuning, mesh as mesh_lib, sharding
from lima_jax.atomic import atomic_write_text
from lima_jax.config import LlamaConfig, preset as config_preset
from lima_jax.model import Llama

GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
CONFIG_FILE = checkpoint.CONFIG_FILE
OPERATIVE_CONFIG = "operative_config.gin"
CHECKPOINTS = "checkpoints"


# ---- recipe and model (gin) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    num_epochs: int
    batch_size: int  # global, in sequences
    max_len: int
    learning_rate: float
    final_learning_rate: float
    warmup_steps: int
    b1: float
    b2: float
    weight_decay: float
    grad_accum_steps: int
    seed: int


@gin.configurable
def recipe(num_epochs: int = gin.REQUIRED, batch_size: int = gin.REQUIRED, max_len: int = gin.REQUIRED,
           learning_rate: float = 1e-5, final_learning_rate: float = 1e-6, warmup_steps: int = 0,
           b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1, grad_accum_steps: int = 1,
           seed: int = 0) -> Recipe:
    """The optimisation recipe; gin/runs/lima_sft.gin sets LIMA §3's values."""
    if batch_size % grad_accum_steps:
        raise ValueError(f"batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum_steps}")
    return Recipe(num_epochs, batch_size, max_len, learning_rate, final_learning_rate, warmup_steps, b1, b2,
                  weight_decay, grad_accum_steps, seed)


@gin.configurable
def model_config(preset: Optional[str] = None, dtype: str = "bfloat16", param_dtype: str = "float32",
                 remat_policy: str = "none", scan_layers: Optional[bool] = None, residual_dropout: float = 0.0,
                 base: Optional[LlamaConfig] = None, platform: Optional[str] = None) -> LlamaConfig:
    """The architecture (a preset, or `base` = the INIT_CHECKPOINT's config, which wins) plus the
    training fields: compute dtype, parameter/optimizer dtype, remat, scan, residual dropout.

    scan_layers=None picks by `platform` (default: JAX's default backend): a scan over the layers on
    TPU and GPU, where deep models compile one layer instead of 80; a Python loop on the CPU, where
    XLA copies a scan's per-layer activations into stacked buffers and back (5-10% of a 58M step)
    and models are small enough to compile unrolled."""
    if base is None:
        if preset is None:
            raise ValueError("model_config.preset is not set: add a gin/models/*.gin file or set INIT_CHECKPOINT")
        base = config_preset(preset)
    if scan_layers is None:
        scan_layers = (platform or jax.default_backend()) != "cpu"
    return base.replace(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                        scan_layers=scan_layers, residual_dropout=residual_dropout)


def learning_rate_schedule(r: Recipe, total_steps: int) -> optax.Schedule:
    """LIMA: linear from learning_rate at step 0 to final_learning_rate at the last step (total - 1)."""
    decay_steps = max(total_steps - 1 - r.warmup_steps, 0)
    decay = optax.linear_schedule(r.learning_rate, r.final_learning_rate, decay_steps)
    if not r.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, r.learning_rate, r.warmup_steps)
    return optax.join_schedules([warmup, decay], [r.warmup_steps])


def make_optimizer(r: Recipe, total_steps: int) -> optax.GradientTransformation:
    """AdamW; RMSNorm scales are not decayed (they are gains, not weights)."""
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: not any("norm" in str(p) for p in path), params)

    return optax.adamw(learning_rate_schedule(r, total_steps), b1=r.b1, b2=r.b2, weight_decay=r.weight_decay,
                       mask=decay_mask)


# ---- state and shardings ----------------------------------------------------------------------
class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # our nested-dict parameter tree (nnx.to_pure_dict layout)
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's seed key; dropout keys are fold_in(key, step)


def _abstract_model(config: LlamaConfig):
    return nnx.split(nnx.eval_shape(lambda: Llama(config)))


def param_shardings(config: LlamaConfig, mesh: Mesh, rules) -> dict:
    _, state = _abstract_model(config)
    return nnx.to_pure_dict(sharding.param_shardings(state, mesh, rules))


def abstract_params(config: LlamaConfig) -> dict:
    _, state = _abstract_model(config)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def state_shardings(config: LlamaConfig, optimizer, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState with shardings, TrainState of shardings): optimizer moments follow their
    parameter's sharding, everything else is replicated."""
    params = abstract_params(config)
    p_shard = param_shardings(config, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, p_shard,
                                      transform_non_params=lambda _: replicated)
    shards = TrainState(replicated, p_shard, opt_shard, replicated)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_abstract,
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shards)
    return abstract, shards


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), rules, mesh))


BATCH_KEYS = {"decoder_input_tokens": jnp.int32, "decoder_target_tokens": jnp.int32,
              "decoder_loss_weights": jnp.float32}


def abstract_batch(global_batch: int, max_len: int, mesh: Mesh, rules) -> dict:
    s = batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct((global_batch, max_len), d, sharding=s) for k, d in BATCH_KEYS.items()}


# ---- loss and step ----------------------------------------------------------------------------
def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(sum of weighted cross-entropy, sum of weighted correct predictions, sum of weights) over the
    batch. The step divides by the whole step's weight sum: the mean over assistant tokens (and EOT).

    A prediction is correct when the target's logit is the largest (argmax == target, save exact
    ties): compared with the row maximum that logsumexp computes anyway, instead of an argmax, a
    separate pass over the [batch, length, vocab] logits (2-3% of a 58M CPU train step in A/B)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(correct * weights), jnp.sum(weights)


def model_flops_per_step(config: LlamaConfig, global_batch: int, seq_len: int) -> float:
    """6·N per token for the matmul parameters (the embedding lookup is not a matmul) plus attention's
    12·layers·heads·head_dim·seq_len per token (PaLM's estimate, no causal discount)."""
    n = config.num_params() - config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return float(global_batch * seq_len * (6 * n + attention))


def grad_norm(grads) -> jax.Array:
    """The global L2 norm of the gradients (float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))


class TrainStep(NamedTuple):
    """What lima-train runs and lima-aot compiles: `fn(state, batch) -> (state, metrics)` jitted with
    explicit shardings and the state donated, plus abstract inputs (ShapeDtypeStruct with shardings)."""
    fn: Any
    abstract_state: TrainState
    abstract_batch: dict
    state_shardings: TrainState
    batch_sharding: NamedSharding
    optimizer: Any
    schedule: Any


def build_train_step(config: LlamaConfig, r: Recipe, mesh: Mesh, rules, fsdp_axes=("fsdp",),
                     total_steps: int = 1) -> TrainStep:
    optimizer = make_optimizer(r, total_steps)
    schedule = learning_rate_schedule(r, total_steps)
    abstract, shards = state_shardings(config, optimizer, mesh, rules)
    b_shard = batch_sharding(mesh, rules)
    graphdef, _ = _abstract_model(config)
    accum = r.grad_accum_steps
    blas = cpu_gemm.usable_on(mesh)

    def loss_fn(params, micro, key, denom):
        """(this microbatch's share of the step's mean loss, its correct predictions): divided by the
        whole step's weight here, so the gradients come out as the mean's, with no pass over them after."""
        model = nnx.merge(graphdef, params)
        logits = model(micro["decoder_input_tokens"], dropout_key=key).logits
        loss_sum, correct, _ = token_loss(logits, micro["decoder_target_tokens"], micro["decoder_loss_weights"])
        return loss_sum / denom, correct

    def step(state: TrainState, batch: dict):
        with sharding.use_rules(mesh, rules, fsdp_axes), cpu_gemm.enabled(blas):
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            # Microbatch j takes rows j, j + accum, ...: each device keeps its own rows (no reshuffle).
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                                 batch)
            weight = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
            denom = jnp.maximum(weight, 1.0)

            def micro_grads(j, mb):
                """((loss share, correct), grads) of microbatch j."""
                mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, b_shard), mb)
                return jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb, jax.random.fold_in(step_key, j),
                                                                  denom)

            def accumulate(carry, xs):
                grads, loss, correct = carry
                (l, c), g = micro_grads(*xs)
                grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
                grads = jax.lax.with_sharding_constraint(grads, shards.params)
                return (grads, loss + l, correct + c), None

            if accum == 1:  # no zero-filled accumulator to write and add to (a pass over all params)
                (loss, correct), grads = micro_grads(0, jax.tree.map(lambda x: x[0], micro))
            else:
                zeros = jax.tree.map(jnp.zeros_like, state.params)
                zero = jnp.zeros((), jnp.float32)
                (grads, loss, correct), _ = jax.lax.scan(accumulate, (zeros, zero, zero), (jnp.arange(accum), micro))
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm(grads),
                       "lr": schedule(state.step), "loss_tokens": weight}
            return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(shards, b_shard), out_shardings=(shards, replicated), donate_argnums=0,
                 compiler_options=cpu_tuning.compiler_options(mesh.devices.flat[0].platform, training=True))
    batch = abstract_batch(r.batch_size, r.max_len, mesh, rules)
    return TrainStep(fn, abstract, batch, shards, b_shard, optimizer, schedule)


def init_state(config: LlamaConfig, ts: TrainStep, seed: int, init_checkpoint: Optional[str]) -> TrainState:
    """Random parameters from `seed`, or INIT_CHECKPOINT's, restored straight into their shards."""
    if init_checkpoint:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.abspath(os.path.join(init_checkpoint, checkpoint.PARAMS_DIR)),
                                   ts.abstract_state.params)
    else:
        params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(config, seed=seed), nnx.Param)),
                         out_shardings=ts.state_shardings.params)()
    opt_state = jax.jit(ts.optimizer.init, out_shardings=ts.state_shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), ts.state_shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), ts.state_shardings.step)
    return TrainState(step, params, opt_state, rng)


# ---- checkpoints ------------------------------------------------------------------------------
def _manager(model_dir: str, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(model_dir, CHECKPOINTS)), options=options,
                                 item_names=("params", "state", "data", "meta"))


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


def restore_model_dir_params(model_dir: str, step: Optional[int] = None) -> tuple[LlamaConfig, dict]:
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


def _save(mngr, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)


def _restore(mngr, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    import orbax.checkpoint as ocp

    rest = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params), state=ocp.args.StandardRestore(rest),
        data=ocp.args.JsonRestore()))
    s = out["state"]
    return TrainState(s["step"], out["params"], s["opt_state"], s["rng"]), out["data"]


# ---- metrics ----------------------------------------------------------------------------------
PEAK_FLOPS = (("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
              ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # bf16 dense, per device


def peak_flops_per_device() -> Optional[float]:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS if k.lower() in kind.lower()), None)


class ScalarWriter:
    """TensorBoard scalars: event records written with tensorboard's RecordWriter to a local file
    (tensorboard's own EventFileWriter goes through tf.io.gfile and would import TensorFlow: ~10 s)."""

    def __init__(self, log_dir: str):
        import socket

        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(os.path.join(log_dir, name), "wb")
        self._records = RecordWriter(self._file)
        self._records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, step: int, scalars: dict) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _memory_report(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "memory_analysis: not available on this backend"
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    return (f"compiled train step, per device: arguments {gib(m.argument_size_in_bytes)}, outputs "
            f"{gib(m.output_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, aliased "
            f"{gib(m.alias_size_in_bytes)}")


# ---- the loop ---------------------------------------------------------------------------------
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
          checkpoint_every_epoch: bool = True, log_every: int = 1) -> dict:
    """Trains (or resumes, from the latest checkpoint in model_dir) and returns the last metrics."""
    r = recipe()
    cpu_tuning.keep_freed_memory(one_heap=True)  # before the backend starts (it starts XLA's threads)
    mesh = mesh_lib.make_mesh()
    rules, fsdp_axes = mesh_lib.logical_rules()
    base = LlamaConfig.load_json(os.path.join(init_checkpoint, CONFIG_FILE)) if init_checkpoint else None
    config = model_config(base=base, platform=mesh.devices.flat[0].platform)
    primary = jax.process_index() == 0

    ts_probe = batch_sharding(mesh, rules)
    shard_index, num_shards = mesh_lib.host_block(ts_probe, r.batch_size)
    data = _import(input_class)(mixture=mixture, data_dir=data_dir, tokenizer_path=tokenizer_path,
                                global_batch_size=r.batch_size, max_len=r.max_len, seed=r.seed,
                                shard_index=shard_index, num_shards=num_shards, split="train")
    steps_per_epoch = int(data.steps_per_epoch)
    total_steps = r.num_epochs * steps_per_epoch
    ts = build_train_step(config, r, mesh, rules, fsdp_axes, total_steps)

    os.makedirs(model_dir, exist_ok=True)
    if primary:
        atomic_write_text(os.path.join(model_dir, CONFIG_FILE), json.dumps(config.to_dict(), indent=2, sort_keys=True))
    mngr = _manager(model_dir)
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = _restore(mngr, latest, ts.abstract_state)
        data.set_state(data_state)
        print(f"resumed from {model_dir}/{CHECKPOINTS}/{latest}", flush=True)
    else:
        state = init_state(config, ts, r.seed, init_checkpoint)
    step = int(state.step)

    compiled = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile()
    print(f"mesh {dict(mesh.shape)}; {config.num_params():,} parameters; {steps_per_epoch} steps/epoch × "
          f"{r.num_epochs} epochs = {total_steps} steps; batch {r.batch_size} × {r.max_len}", flush=True)
    print(_memory_report(compiled), flush=True)
    if primary:
        atomic_write_text(os.path.join(model_dir, OPERATIVE_CONFIG), gin.operative_config_str())

    flops = model_flops_per_step(config, r.batch_size, r.max_len)
    peak = (peak_flops or peak_flops_per_device() or 0.0) * jax.device_count()
    writer = ScalarWriter(os.path.join(model_dir, "tensorboard")) if primary else None
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
            batch = {k: jax.make_array_from_process_local_data(ts.batch_sharding, np.asarray(local[k], d),
                                                               (r.batch_size, r.max_len))
                     for k, d in BATCH_KEYS.items()}
            new_state, metrics = compiled(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["loss"]):
                done = list_checkpoint_steps(model_dir)
                raise FloatingPointError(
                    f"lima_jax/train.py: loss is {metrics['loss']} at step {step + 1}; stopped without saving; "
                    f"last good checkpoint: {f'{model_dir}/{CHECKPOINTS}/{done[-1]}' if done else 'none'}")
            state, step = new_state, step + 1
            dt = time.perf_counter() - t0
            metrics.update(step_time_s=dt, tokens_per_s=r.batch_size * r.max_len / dt)
            if peak:
                metrics["mfu"] = flops / dt / peak
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
                        "steps_per_epoch": steps_per_epoch}
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
            writer.close()
    return last


# ---- command line -----------------------------------------------------------------------------
def parse_gin(gin_files, gin_bindings) -> None:
    gin.clear_config()
    # Includes ('models/tiny.gin') resolve against the project's gin/ first: gin's resource reader
    # logs a spurious error for every prefix that misses, so the one that hits must come first.
    prefixes = gin.config._LOCATION_PREFIXES
    if GIN_ROOT not in prefixes:
        prefixes.insert(0, GIN_ROOT)
    files = [os.path.abspath(f) if os.path.exists(f) else f for f in gin_files]
    gin.parse_config_files_and_bindings(files, gin_bindings)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="lima-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later wins)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding, e.g. NUM_EPOCHS=3")
    parser.add_argument("--model_dir", required=True, help="where checkpoints, config and TensorBoard go")
    parser.add_argument("--coordinator_address", help="multi-host: host:port of process 0 (not on Cloud TPU)")
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    args = parser.parse_args(argv)
    parse_gin(args.gin_file, args.gin_bindings)
    if args.coordinator_address:
        with gin.unlock_config():
            gin.bind_parameter("initialize_distributed.coordinator_address", args.coordinator_address)
            gin.bind_parameter("initialize_distributed.num_processes", args.num_processes)
            gin.bind_parameter("initialize_distributed.process_id", args.process_id)
    mesh_lib.initialize_distributed()
    return train(args.model_dir)


if __name__ == "__main__":
    main()
