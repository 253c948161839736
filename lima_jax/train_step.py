"""The train state, its shardings, the loss and the compiled train step: what lima-train runs and
lima-aot compiles for TPU slices (`build_train_step`)."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax import checkpoint, sharding
from lima_jax.config import LlamaConfig
from lima_jax.model import Llama, abstract_params
from lima_jax.optimizer import Recipe, learning_rate_schedule, make_optimizer


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # our nested-dict parameter tree (nnx.to_pure_dict layout)
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's seed key; dropout keys are fold_in(key, step)


def param_shardings(config: LlamaConfig, mesh: Mesh, rules) -> dict:
    _, state = nnx.split(nnx.eval_shape(lambda: Llama(config)))
    return nnx.to_pure_dict(sharding.param_shardings(state, mesh, rules))


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


# A batch: rows of max_len tokens, each row one example (padded) or several (packed); the segment ids
# (0 = padding) and each token's position in its own example say which.
BATCH_KEYS = {"decoder_input_tokens": jnp.int32, "decoder_target_tokens": jnp.int32,
              "decoder_loss_weights": jnp.float32, "decoder_segment_ids": jnp.int32, "decoder_positions": jnp.int32}


def abstract_batch(rows: int, max_len: int, mesh: Mesh, rules) -> dict:
    s = batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct((rows, max_len), d, sharding=s) for k, d in BATCH_KEYS.items()}


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(sum of weighted cross-entropy, sum of weighted correct predictions, sum of weights) over the
    batch. The step divides by the whole step's weight sum: the mean over assistant tokens (and EOT).

    A prediction is correct when the target's logit is the largest (argmax == target, save exact
    ties): compared with the row maximum that logsumexp computes anyway, instead of an argmax, a
    separate pass over the [batch, length, vocab] logits."""
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
    explicit shardings and the state donated, plus abstract inputs (ShapeDtypeStruct with shardings;
    the batch's for `rows` rows: `abstract_batch(rows, ...)` gives another row count, one compile each)."""
    fn: Any
    abstract_state: TrainState
    abstract_batch: dict
    state_shardings: TrainState
    batch_sharding: NamedSharding
    optimizer: Any
    schedule: Any


def build_train_step(config: LlamaConfig, r: Recipe, mesh: Mesh, rules, fsdp_axes=("fsdp",),
                     total_steps: int = 1, rows: Optional[int] = None, unroll_microbatches: bool = False) -> TrainStep:
    """rows: the abstract batch's row count (default the padded batch, r.batch_size).
    unroll_microbatches: the accumulation loop unrolled (lima-aot's prediction: the compiler's cost
    analysis counts a loop's body once); the same computation either way."""
    optimizer = make_optimizer(r, total_steps)
    schedule = learning_rate_schedule(r, total_steps)
    abstract, shards = state_shardings(config, optimizer, mesh, rules)
    b_shard = batch_sharding(mesh, rules)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config)))
    accum = r.grad_accum_steps

    def loss_fn(params, micro, key, denom):
        """(this microbatch's share of the step's mean loss, its correct predictions): divided by the
        whole step's weight here, so the gradients come out as the mean's, with no pass over them after."""
        model = nnx.merge(graphdef, params)
        logits = model(micro["decoder_input_tokens"], dropout_key=key, segment_ids=micro["decoder_segment_ids"],
                       positions=micro["decoder_positions"]).logits
        loss_sum, correct, _ = token_loss(logits, micro["decoder_target_tokens"], micro["decoder_loss_weights"])
        return loss_sum / denom, correct

    def step(state: TrainState, batch: dict):
        with sharding.use_rules(mesh, rules, fsdp_axes):
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
                (grads, loss, correct), _ = jax.lax.scan(accumulate, (zeros, zero, zero), (jnp.arange(accum), micro),
                                                         unroll=accum if unroll_microbatches else 1)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
            metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm(grads),
                       "lr": schedule(state.step), "loss_tokens": weight,
                       "real_tokens": jnp.sum(segments > 0), "examples": jnp.sum((segments > 0) & (positions == 0))}
            return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(shards, b_shard), out_shardings=(shards, replicated), donate_argnums=0)
    batch = abstract_batch(rows or r.batch_size, r.max_len, mesh, rules)
    return TrainStep(fn, abstract, batch, shards, b_shard, optimizer, schedule)


def init_state(config: LlamaConfig, ts: TrainStep, seed: int, init_checkpoint: Optional[str]) -> TrainState:
    """Random parameters from `seed`, or INIT_CHECKPOINT's, restored straight into their shards."""
    if init_checkpoint:
        params = checkpoint.restore_converted_params(init_checkpoint, ts.abstract_state.params)
    else:
        params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(config, seed=seed), nnx.Param)),
                         out_shardings=ts.state_shardings.params)()
    opt_state = jax.jit(ts.optimizer.init, out_shardings=ts.state_shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), ts.state_shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), ts.state_shardings.step)
    return TrainState(step, params, opt_state, rng)
