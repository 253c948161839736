"""The (data, fsdp, tensor) device mesh, gin-free: its axes, its sizes and its construction. mesh.py
configures it from gin for lima-train; tools that run without gin (tools/gpu_check.py) build the same
mesh here."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_sizes(data: int, fsdp: int, tensor: int, n_devices: int) -> list[int]:
    """[data, fsdp, tensor] over n_devices, the one -1 (if any) filled in with the rest."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: {n_devices} devices are not "
                             f"divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{n_devices} are present")
    return sizes


def device_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, of every host); one size may be -1 =
    the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    try:  # topology-aware order on TPU; a plain reshape elsewhere
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, AXES)
