"""The training recipe as gin sets it (gin/runs/lima_sft.gin: LIMA §3), the model config trained, and
the optimizer with its schedule."""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax
import optax

from lima_jax.config import LlamaConfig, default_attention_kernel, preset as config_preset


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
                 base: Optional[LlamaConfig] = None, platform: Optional[str] = None,
                 attention_kernel: Optional[str] = None) -> LlamaConfig:
    """The architecture (a preset, or `base` = the INIT_CHECKPOINT's config, which wins) plus the
    training fields: compute dtype, parameter/optimizer dtype, remat, scan, residual dropout, attention
    kernel.

    scan_layers=None picks by `platform` (default: JAX's default backend): a scan over the layers on
    TPU and GPU, where deep models compile one layer instead of 80; a Python loop on the CPU, where
    the models are small enough to compile unrolled. Both run the same layers on the same stacked
    parameters.

    attention_kernel=None picks by `platform` too (config.default_attention_kernel): the Pallas splash
    kernel on TPU, XLA's attention elsewhere. Like the other training fields it replaces `base`'s, so a
    checkpoint trained on TPU ("splash") trains on with "xla" on a CPU or GPU."""
    if base is None:
        if preset is None:
            raise ValueError("model_config.preset is not set: add a gin/models/*.gin file or set INIT_CHECKPOINT")
        base = config_preset(preset)
    platform = platform or jax.default_backend()
    if scan_layers is None:
        scan_layers = platform != "cpu"
    return base.replace(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                        scan_layers=scan_layers, residual_dropout=residual_dropout,
                        attention_kernel=attention_kernel or default_attention_kernel(platform))


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
