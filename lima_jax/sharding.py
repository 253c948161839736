"""Logical axis names → mesh axes: the one table, and the helpers that apply it.

Every parameter carries logical names as metadata (`out_sharding`); every activation passes
through `constrain(x, names)`. A layout is a rules table, e.g.
    (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ...)
Names not in the table are replicated. Outside `use_rules(...)` all of this is a no-op, so the
model runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, object]]

# Parameters use the plain names; activations use "act_*" for the hidden dimension because an
# FSDP layout shards the *parameter* embed axis but never the activation's.
PARAM_AXES = ("layers", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim")
ACTIVATION_AXES = ("batch", "length", "act_length", "act_embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")

_active: list[tuple[Mesh, Rules, tuple[str, ...]]] = []


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules, fsdp_axes: Sequence[str] = ()) -> Iterator[None]:
    """Within this context `constrain` shards activations on `mesh` according to `rules`.

    fsdp_axes: mesh axes that shard parameters for storage only (FSDP); `gather_layer_params` then
    all-gathers each layer's weights over them inside the layer loop. Empty: no gathering."""
    _active.append((mesh, tuple(rules), tuple(fsdp_axes)))
    try:
        yield
    finally:
        _active.pop()


def logical_to_spec(names: Optional[Sequence[Optional[str]]], rules: Rules, mesh: Optional[Mesh] = None,
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """PartitionSpec for logical `names`. A mesh axis is used at most once per array; with `mesh` and
    `shape` given, a dimension that the mesh axes do not divide stays replicated."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None:
                size = 1
                for a in axes:
                    size *= mesh.shape[a]
                if shape[i] % size:
                    axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """with_sharding_constraint by logical names, when a mesh/rules context is active."""
    if not _active:
        return x
    mesh, rules, _ = _active[-1]
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather_layer_params(layer_state):
    """All-gathers one layer's parameters (an nnx.State sliced from the stacked layers) over the active
    fsdp_axes, with shard_map + all_gather, so XLA materialises one layer's full weights at a time. A
    plain sharding constraint inside the scan is not enough: XLA then gathers every layer's weights at
    once (a 65B step on 256 TPU devices asked for 28 GiB of temporaries, against 1.35 GiB this way). The gradient of the gather is a per-layer reduce-scatter. No-op
    outside `use_rules(..., fsdp_axes=...)`."""
    if not _active or not _active[-1][2]:
        return layer_state
    from flax import nnx

    mesh, rules, fsdp_axes = _active[-1]

    def one(var):
        names = var.get_metadata().get("out_sharding")
        value = var[...]
        if names is None:
            return var
        names = tuple(names)[len(names) - value.ndim:]  # a sliced layer has lost its "layers" axis
        spec = logical_to_spec(names, rules, mesh, value.shape)
        gathered = []  # per dim: the mesh axes to gather; a mixed entry is gathered whole
        for entry in spec:
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            gathered.append(axes if any(a in fsdp_axes for a in axes) else ())
        if not any(gathered):
            return var
        out_spec = PartitionSpec(*(None if g else e for g, e in zip(gathered, spec)))

        def gather(x):
            for dim, axes in enumerate(gathered):
                if axes:
                    x = jax.lax.all_gather(x, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
            return x

        # all_gather's result is the same on every fsdp shard, which check_vma cannot infer.
        full = jax.shard_map(gather, mesh=mesh, in_specs=spec, out_specs=out_spec, check_vma=False)(value)
        return var.replace(full)

    return jax.tree.map(one, layer_state, is_leaf=lambda x: isinstance(x, nnx.Variable))



def platform() -> str:
    """The platform the traced program runs on: the active mesh's devices (lima-aot compiles for TPU
    devices from a CPU host), else JAX's default backend."""
    if _active and isinstance(_active[-1][0], Mesh):  # an AbstractMesh has no devices
        return _active[-1][0].devices.flat[0].platform
    return jax.default_backend()


def per_device_attention(local, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """local(q, k, v, segment_ids) → [B,T,H,D] on each device's rows (the `batch` rule) and heads
    (`heads`/`kv_heads`), the sequence whole, under shard_map: for attention kernels that XLA cannot
    partition, or partitions only when q, k and v split alike (cuDNN's). q [B,T,H,D], k/v [B,T,KVH,D],
    segment_ids [B,T]. Without an active mesh of several devices: local on the whole arrays."""
    if not _active or _active[-1][0].size <= 1:
        return local(q, k, v, segment_ids)
    mesh, rules, _ = _active[-1]
    h, kvh = q.shape[2], k.shape[2]
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh, q.shape)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k.shape)
    rows, heads, kv_heads = q_spec[0], q_spec[2], kv_spec[2]
    if kv_heads != heads and kvh > 1:
        # The kv heads do not split as the query heads do (too few of them for the tensor axis): each
        # query head gets its own copy, so a device's query heads find their kv heads on that device.
        # (One kv head, MQA, is every query head's: each device keeps it whole.)
        k, v = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
        kv_heads = heads
    q_spec, kv_spec = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None, kv_heads, None)
    # check_vma=False: kernels are not typed for varying manual axes; the output varies over the mesh
    # exactly as q does (out_specs), which the gradient's transpose relies on.
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(rows, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


# The default layout: FSDP over ("data", "fsdp") for parameters' embed axis, tensor parallelism over
# heads / mlp / vocab, the batch over every data-like axis, and the residual stream's sequence
# ("act_length") over the tensor axis too (sequence parallelism: model.RESIDUAL_NAMES). gin/ may
# override it (gin/meshes/rules.gin).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_length", "tensor"),
    ("act_embed", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
)


def param_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedSharding per parameter (same tree as `state`, an nnx.State of Params) from its logical names."""
    from flax import nnx

    def one(var):
        names = var.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh, var.shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
