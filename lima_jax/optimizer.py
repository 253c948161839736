"""The optimisation recipe's values, the learning-rate schedule and the optimizer: gin-free, so the
train step imports where gin is not installed (tools/gpu_check.py). recipe.py sets them from gin."""
from __future__ import annotations

import dataclasses

import jax
import optax


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
