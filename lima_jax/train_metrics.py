"""What lima-train reports: TensorBoard scalars, model FLOPs utilisation, the compiled step's memory."""
from __future__ import annotations

from typing import Optional

import jax

PEAK_FLOPS = (("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
              ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # bf16 dense, per device


def peak_flops_per_device() -> Optional[float]:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS if k.lower() in kind.lower()), None)


class ScalarWriter:
    """TensorBoard scalars through TensorBoard's own framework-free writer (`tensorboard.summary.Writer`:
    it runs no TensorFlow ops, so TensorFlow never claims an accelerator)."""

    def __init__(self, log_dir: str):
        from tensorboard.summary import Writer

        self._writer = Writer(log_dir)

    def write(self, step: int, scalars: dict) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def memory_report(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "memory_analysis: not available on this backend"
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    return (f"compiled train step, per device: arguments {gib(m.argument_size_in_bytes)}, outputs "
            f"{gib(m.output_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, aliased "
            f"{gib(m.alias_size_in_bytes)}")
