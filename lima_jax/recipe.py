"""The gin layer of training: the recipe as gin sets it (gin/runs/lima_sft.gin: LIMA §3) and the model
config trained. The Recipe's type, the schedule and the optimizer live gin-free in optimizer.py."""
from __future__ import annotations

from typing import Optional

import gin
import jax

from lima_jax.config import LlamaConfig, default_attention_kernel, preset as config_preset
from lima_jax.optimizer import Recipe


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
    kernel on TPU, cuDNN's on GPU, XLA's attention elsewhere. Like the other training fields it
    replaces `base`'s, so a checkpoint trained on TPU ("splash") trains on with "cudnn" on a GPU."""
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

