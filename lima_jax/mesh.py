"""Device meshes and hosts, configured from gin (gin/meshes/*.gin); the mesh itself is built by
device_mesh.py.

The mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism whose parameters and
optimizer state are sharded, gathered one layer at a time) and "tensor" (heads / mlp / vocab split).
Which logical names go to which axis is the rules table (`logical_rules`), also set in gin.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lima_jax import sharding
from lima_jax.device_mesh import device_mesh


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of every host); one size may be -1 = the rest."""
    return device_mesh(data, fsdp, tensor, devices)


@gin.configurable
def logical_rules(rules: Optional[Sequence] = None, fsdp_axes: Sequence[str] = ("fsdp",)):
    """(rules, fsdp_axes): the one logical → mesh table (gin/meshes/rules.gin) and the axes whose
    parameter shards are all-gathered per layer. rules=None: sharding.DEFAULT_RULES."""
    table = sharding.DEFAULT_RULES if rules is None else tuple(
        (name, tuple(target) if isinstance(target, list) else target) for name, target in rules)
    return tuple(table), tuple(fsdp_axes)


@gin.configurable
def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, cpu_collectives: str = "gloo") -> None:
    """jax.distributed.initialize when configured: explicitly with a coordinator address (CPU, GPU, or
    any cluster), or automatically on a multi-worker Cloud TPU slice. Must run before JAX computes."""
    if coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a TPU pod slice: JAX finds its peers
        jax.distributed.initialize()


def batch_shards(batch_sharding: NamedSharding) -> int:
    """How many pieces the batch (rows) dimension is split into across the mesh."""
    axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))


def host_block(batch_sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """(shard_index, num_shards): which contiguous block of each global batch this host's devices hold,
    so that the host loads exactly those rows and `make_array_from_process_local_data` places them."""
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map((global_batch, 1)).values():
        rows.update(range(*index[0].indices(global_batch)))
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or global_batch % size or lo % size:
        raise ValueError(f"host {jax.process_index()} holds batch rows {sorted(rows)[:8]}..., not one "
                         f"contiguous block of the global batch {global_batch}: change the mesh order")
    return lo // size, global_batch // size
