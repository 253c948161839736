"""lima-aot: compile the real LIMA train (or decode) step for a Cloud TPU slice, on this machine.

The TPU compiler (libtpu, the `tpu` extra) compiles against `jax.experimental.topologies` devices:
nothing is allocated, no TPU is needed. The program is the one lima-train runs
(`train_step.build_train_step`, built from the same gin files), so "fits" is about the real step.

Slices map to topologies through one table. Devices per slice, as the compiler sees them here
(checked with libtpu 0.0.52): a v4 chip is two devices (one per TensorCore, 16 GiB HBM each), a v5p
chip one device (both TensorCores, 95 GiB), a v5e chip one device (one TensorCore, 16 GiB).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Optional

from lima_jax.atomic import atomic_write_text

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # Cloud name, e.g. "v4-256" (v4/v5p: TensorCores; v5e: chips)
    topology: str  # for get_topology_desc
    chips: int
    devices: int  # JAX devices the compiler sees
    hbm_per_device: int  # bytes


def _v4_like(gen: str, cores: int, hbm_chip_gib: float, devices_per_chip: int) -> Slice:
    chips = cores // 2
    shape = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}[chips]
    prefix = {"v4": "v4", "v5p": "v5"}[gen]
    return Slice(f"{gen}-{cores}", f"{prefix}:{shape}", chips, chips * devices_per_chip,
                 int(hbm_chip_gib * GIB / devices_per_chip))


def _v5e(chips: int) -> Slice:
    shape = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}[chips]
    return Slice(f"v5e-{chips}", f"v5e:{shape}", chips, chips, 16 * GIB)


SLICES: dict[str, Slice] = {}
for _cores in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
    SLICES[f"v4-{_cores}"] = _v4_like("v4", _cores, 32, 2)
for _cores in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
    SLICES[f"v5p-{_cores}"] = _v4_like("v5p", _cores, 95, 1)
for _chips in (1, 4, 8, 16, 32, 64, 128, 256):
    SLICES[f"v5e-{_chips}"] = _v5e(_chips)
# This machine's CPU devices (lima-aot sets XLA_FLAGS=--xla_force_host_platform_device_count=N): the
# planner's fast path for tests, where a step's time is measured by running it, not predicted.
for _n in (1, 2, 4, 8):
    SLICES[f"cpu-{_n}"] = Slice(f"cpu-{_n}", "cpu", _n, _n,
                                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _n)


def get_slice(name: str) -> Slice:
    if name not in SLICES:
        raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
    return SLICES[name]


# bf16 peak FLOP/s per chip, as Google publishes them: what predicted MFU is measured against. (The
# compiler's own cost model peaks at 137 TFLOP/s per v4 device, half a chip, and 394 per v5p chip.)
CHIP_PEAK_FLOPS = {"v4": 275e12, "v5p": 459e12, "v5e": 197e12}
# Compiler options of the prediction's compiles, per generation, so that the cost model prices every
# op of the step. All: no collective matmuls ("windowed einsums": XLA splits an all-gather or
# reduce-scatter next to a matmul into a loop of collective-permutes and partial matmuls), since the
# cost analysis counts a loop's body once; with sequence parallelism most of a layer's tensor-parallel
# matmuls became such loops and their flops vanished from the prediction. The same program without
# them, priced whole: a TPU running the loops overlaps their transfers, so this bounds the time from above.
# v4: no CMEM (the chip's 128 MiB common memory) in memory-space assignment. libtpu 0.0.52's cost
# model has no cost for traffic to and from CMEM: each op that touches it is costed -1 s, so LIMA's
# steps, whose 2048-token attention buffers land there, came out at negative totals. Without CMEM the
# program is one v4 runs as well, from HBM alone, and the cost model prices all of it.
_NO_COLLECTIVE_MATMULS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                          "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
PREDICT_COMPILER_OPTIONS = {"v4": {**_NO_COLLECTIVE_MATMULS, "xla_tpu_cmem_memory_space_assignment": False},
                            "v5p": _NO_COLLECTIVE_MATMULS, "v5e": _NO_COLLECTIVE_MATMULS}
# Depths at which the layer stack is compiled unrolled to predict the whole step (the compiler's cost
# analysis counts a scanned loop's body once): time is linear in the layers, so two depths fix it.
PREDICT_DEPTHS = (2, 3)


def chip_peak_flops(s: Slice) -> Optional[float]:
    return CHIP_PEAK_FLOPS.get(s.name.split("-")[0])


def program_cost(compiled) -> dict:
    """The compiler's cost analysis of one device's program: flops, bytes accessed, optimal_seconds."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def optimal_seconds(compiled) -> float:
    """The TPU compiler's roofline time for the program (its cost model; CPU compiles have none)."""
    cost = program_cost(compiled)
    if "optimal_seconds" not in cost:
        raise RuntimeError("the compiler reports no optimal_seconds: only TPU compiles predict time")
    return float(cost["optimal_seconds"])


_FUNC = re.compile(r"func\.func (?:public|private) @([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")


def mosaic_calls(lowered_text: str) -> list[str]:
    """Each Mosaic kernel call the program makes, as its line in the lowered module, once
    per execution: a function JAX lowered once and calls from several places (each layer's attention,
    each microbatch) counts once per call site, from `main` down."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in lowered_text.splitlines():
        m = _FUNC.search(line)
        if m:
            name = m.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)

    def calls(fn: str, seen: tuple = ()) -> list[str]:
        out = []
        for line in bodies.get(fn, []):
            if "tpu_custom_call" in line:
                out.append(line)
            for callee in _CALL.findall(line):
                if callee in bodies and callee not in seen:
                    out += calls(callee, seen + (fn,))
        return out

    return calls("main")


def kernel_flops(lowered_text: str) -> float:
    """Flops per device of the program's Mosaic kernels (the splash attention's), which the TPU cost
    model does not count."""
    from lima_jax.splash_attention import kernel_flops as one_call

    return sum(one_call(line) for line in mosaic_calls(lowered_text))


_PEAKS: dict[str, float] = {}  # cost_model_peak per device kind: one compile per process


def cost_model_peak(device) -> float:
    """The cost model's bf16 matmul rate on one device (flops/s): a large matmul's flops over its
    predicted time (137e12 on a v4 device, 394e12 on v5p)."""
    if device.device_kind not in _PEAKS:
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        n = 8192
        a = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(Mesh([device], ("x",)), PartitionSpec()))
        _PEAKS[device.device_kind] = 2.0 * n ** 3 / optimal_seconds(jax.jit(jnp.matmul).lower(a, a).compile())
    return _PEAKS[device.device_kind]


def extend_linearly(at: dict, depth: int) -> float:
    """The value at `depth` of the line through the two (depth, value) points of `at` (or the value
    itself when `at` holds `depth`)."""
    if depth in at:
        return at[depth]
    (d0, v0), (d1, v1) = sorted(at.items())[:2]
    return v0 + (depth - d0) * (v1 - v0) / (d1 - d0)


def measure_step(compiled, abstract_args, repeats: int = 3) -> dict:
    """Best of `repeats` runs of the compiled step on zero inputs, after one warm-up: the CPU devices'
    stand-in for the TPU compiler's prediction (they have no cost model)."""
    import jax
    import numpy as np

    times = []
    for _ in range(repeats + 1):
        args = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), abstract_args)
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return {"predicted_step_s": min(times[1:]),
            "prediction_method": f"measured on this machine's CPU devices (best of {repeats} runs)"}


def predict_by_depth(lower_at, num_layers: int, peak_per_device: float,
                     compiler_options: Optional[dict] = None) -> dict:
    """Predicted seconds and bytes accessed per device of a program with `num_layers` layers, from
    compiles of `lower_at(depth)` (the program with its layer loop unrolled, `depth` layers) with
    `compiler_options`: at every layer when the model has at most max(PREDICT_DEPTHS) layers, else at
    PREDICT_DEPTHS, extended. The cost model's time plus the Mosaic kernels' flops at
    `peak_per_device` (the cost model's own matmul rate, `cost_model_peak`): it sees only their bytes."""
    depths = (num_layers,) if num_layers <= max(PREDICT_DEPTHS) else PREDICT_DEPTHS
    seconds, moved, kernels, cost_model = {}, {}, {}, {}
    for d in depths:
        lowered = lower_at(d)
        compiled = lowered.compile(compiler_options=compiler_options or None)
        kernels[d] = kernel_flops(lowered.as_text())
        cost_model[d] = optimal_seconds(compiled)
        seconds[d] = cost_model[d] + kernels[d] / peak_per_device
        moved[d] = float(program_cost(compiled).get("bytes accessed", 0.0))
    method = (f"unrolled at all {num_layers} layers" if len(depths) == 1 else
              f"unrolled at {depths[0]} and {depths[1]} layers, extended linearly to {num_layers}")
    if any(kernels.values()):
        method += "; Mosaic kernels' flops added at the cost model's matmul rate"
    if min(seconds.values()) <= 0:
        # Seen with libtpu 0.0.52 on v4 with CMEM (see PREDICT_COMPILER_OPTIONS): the total comes out
        # near a negative integer, some ops costed -1 s ("unknown"). No prediction rather than a wrong one.
        return {"predicted_step_s": None, "prediction_method": method,
                "predicted_s_at_depths": {str(d): t for d, t in seconds.items()},
                "prediction_note": "the compiler's cost model gave a non-positive time: no prediction"}
    return {"predicted_step_s": extend_linearly(seconds, num_layers),
            "predicted_bytes_per_device": extend_linearly(moved, num_layers),
            "kernel_flops_per_device": extend_linearly(kernels, num_layers),
            "cost_model_step_s": extend_linearly(cost_model, num_layers),
            "prediction_method": method, "predicted_s_at_depths": {str(d): t for d, t in seconds.items()}}


def topology_devices(s: Slice) -> list:
    import jax
    from jax.experimental import topologies

    if s.topology == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < s.devices:
            raise RuntimeError(f"{s.name} needs {s.devices} CPU devices, this process has {len(devices)} (set "
                               f"XLA_FLAGS=--xla_force_host_platform_device_count={s.devices} before JAX starts)")
        return devices[:s.devices]

    # Compiling touches no TPU, so two AOT processes (or a test run beside a lima-aot run) may share
    # libtpu; without this its lockfile refuses the second one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=s.topology).devices)
    except Exception as e:  # libtpu missing or topology unknown: one line, the cause
        raise RuntimeError(f"cannot describe TPU topology {s.topology} for {s.name} (is the 'tpu' extra, libtpu, "
                           f"installed?): {str(e).splitlines()[0]}") from None
    if len(devices) != s.devices:
        raise RuntimeError(f"{s.name}: topology {s.topology} gave {len(devices)} devices, the table says {s.devices}")
    return devices


def default_mesh(n_devices: int, batch_size: int) -> dict:
    """FSDP over as many devices as the batch has rows, tensor parallelism over the rest: the batch
    must split evenly over data × fsdp, and FSDP is the cheaper of the two for LIMA's short runs."""
    fsdp = math.gcd(n_devices, batch_size)
    return {"data": 1, "fsdp": fsdp, "tensor": n_devices // fsdp}


def parse_mesh(text: Optional[str], n_devices: int, batch_size: int) -> dict:
    """'data=2,fsdp=64,tensor=2' → sizes (missing axes: data=1, tensor=1, fsdp=-1 = the rest);
    None → `default_mesh`."""
    if not text:
        return default_mesh(n_devices, batch_size)
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected e.g. data=1,fsdp=64,tensor=4")
        sizes[key.strip()] = int(value)
    return sizes


def _resolved(sizes: dict, n_devices: int) -> dict:
    """Mesh sizes with the one -1 (the rest) filled in, checked against the slice's devices."""
    from lima_jax.device_mesh import AXES, mesh_sizes

    try:
        return dict(zip(AXES, mesh_sizes(sizes["data"], sizes["fsdp"], sizes["tensor"], n_devices)))
    except ValueError as e:
        raise ValueError(f"--mesh {','.join(f'{k}={v}' for k, v in sizes.items())}: {e}") from None


def model_flops_per_step(config, batch_size: int, seq_len: int) -> float:
    from lima_jax.train_step import model_flops_per_step as train_flops

    return train_flops(config, batch_size, seq_len)


# The real LIMA training set's mean example length (LLaMA tokenizer, `[BOS] + (turn + EOT)*`; measured,
# the data is not shipped): a packed step of 32 examples fills about 10.5 rows of 2048 tokens.
LIMA_MEAN_EXAMPLE_TOKENS = 674


def packed_rows(batch_size: int, seq_len: int, row_multiple: int, data=None, epochs: int = 1) -> tuple[int, str]:
    """(rows, how they were found) of the packed step a LIMA run takes most often. data: lima-train's
    input (`data_pipeline.inputs.StepInput`, packing on, the same row multiple): its buckets over the
    run's `epochs` × steps, exactly; without it, LIMA's mean example length, rounded up to the row multiple."""
    from collections import Counter

    from data_pipeline.packing import round_up

    if data is not None:
        counts = Counter(data.rows(e, s) for e in range(epochs) for s in range(int(data.steps_per_epoch)))
        rows, n = counts.most_common(1)[0]
        return rows, f"the data's most used bucket ({n} of {sum(counts.values())} steps; buckets {data.buckets})"
    rows = min(round_up(math.ceil(batch_size * LIMA_MEAN_EXAMPLE_TOKENS / seq_len), row_multiple),
               round_up(batch_size, row_multiple))
    return rows, f"LIMA's mean example length ({LIMA_MEAN_EXAMPLE_TOKENS} tokens) rounded up to {row_multiple} rows"


def _configure(model: str, batch_size: int, seq_len: int, remat: Optional[str], extra_gin: list[str]):
    """The operative recipe and model config of gin/runs/lima_sft.gin for `model`, as lima-train
    sees them, and whether the run packs (the PACKING macro)."""
    import gin

    from lima_jax import gin_config, recipe

    bindings = [f"BATCH_SIZE={batch_size}", f"MAX_LEN={seq_len}", "INIT_CHECKPOINT=None", "DATA_DIR=None",
                "TOKENIZER=None"] + list(extra_gin)
    if remat:
        bindings.append(f"model_config.remat_policy='{remat}'")
    # The loop's own settings (`train.*`: data, checkpoints) do not change the compiled step.
    gin_config.parse([f"models/{model}.gin", "runs/lima_sft.gin"], bindings, skip_unknown=("train",))
    r = recipe.recipe()
    config = recipe.model_config(platform="tpu")  # as lima-train builds it on the slice
    # As trained: the EOT row appended by `lima-convert --add_eot`, rows padded to 128 for even sharding.
    config = config.replace(vocab_size=config.vocab_size + 1, vocab_padding_multiple=128)
    return r, config, bool(gin.query_parameter("%PACKING"))


def compile_step(model: str, slice_name: str, mesh_text: Optional[str] = None, batch_size: int = 32,
                 seq_len: int = 2048, remat: Optional[str] = None, step: str = "train",
                 extra_gin: Optional[list[str]] = None, rows: Optional[int] = None, input_for=None,
                 predict: bool = True) -> dict:
    """Compiles the step for the slice and returns the report (see the issue's field list).

    The train step is the one lima-train runs most: with PACKING (lima_sft.gin's default) the packed
    step of `rows` rows (default `packed_rows`, from `input_for(row_multiple, seed)`, lima-train's
    input for this mesh, when given), else the padded step of batch_size rows. The padded row count
    bounds every packed bucket's memory. predict: also the compiler's predicted step time, MFU and
    tokens/s (`predict_by_depth`: more compiles) when the step fits."""
    from jax.sharding import AbstractMesh

    from lima_jax import mesh as mesh_lib, train_step

    s = get_slice(slice_name)
    r, config, packing = _configure(model, batch_size, seq_len, remat, extra_gin or [])
    sizes = _resolved(parse_mesh(mesh_text, s.devices, batch_size), s.devices)
    rules, fsdp_axes = mesh_lib.logical_rules()
    if step == "train":  # the rows, checked before libtpu starts (it logs to stderr as it does)
        batch_sharding = train_step.batch_sharding(AbstractMesh(tuple(sizes.values()), tuple(sizes)), rules)
        row_multiple = mesh_lib.batch_shards(batch_sharding) * r.grad_accum_steps
        if rows is not None:
            if rows <= 0 or rows % row_multiple:
                raise ValueError(f"--rows {rows} must be a positive multiple of {row_multiple} (the batch's devices "
                                 f"× microbatches on mesh {sizes})")
            how = "given"
        elif packing:
            data = input_for(row_multiple, r.seed) if input_for else None
            rows, how = packed_rows(batch_size, seq_len, row_multiple, data, r.num_epochs)
        else:
            rows, how = batch_size, "padded (PACKING = False)"
    devices = topology_devices(s)
    mesh = mesh_lib.make_mesh(devices=devices, **sizes)
    t0 = time.perf_counter()
    report = {
        "model": model, "topology": s.name, "topology_string": s.topology, "chips": s.chips,
        "mesh": dict(mesh.shape), "n_devices": len(devices), "step": step, "batch_size": batch_size,
        "seq_len": seq_len, "remat": config.remat_policy, "hbm_bytes": s.hbm_per_device,
        "n_params": config.num_params(), "attention_kernel": getattr(config, "attention_kernel", None) or "xla",
    }
    try:
        if step == "train":
            report.update(packing=packing, rows=rows, rows_from=how)
            def build(c, unroll=False):
                return train_step.build_train_step(c, r, mesh, rules, fsdp_axes, total_steps=1, rows=rows,
                                                   unroll_microbatches=unroll)

            def lower_at(c):  # for the prediction: every loop unrolled
                ts = build(c, unroll=True)
                return ts.fn.lower(ts.abstract_state, ts.abstract_batch)

            ts = build(config)
            abstract_args = (ts.abstract_state, ts.abstract_batch)
            lowered = ts.fn.lower(*abstract_args)
            # Model flops of the rows computed (a packed row costs what a padded one does).
            report["model_flops_per_step"] = model_flops_per_step(config, rows, seq_len)
        elif step == "decode":
            from lima_jax import decoding

            # Inference as lima-decode runs it: bf16 weights, no dropout, a cache of seq_len slots.
            config = config.replace(dtype="bfloat16", param_dtype="bfloat16", residual_dropout=0.0)

            def lower_at(c):
                return decoding.lower_decode_step(c, mesh, rules, batch_size, seq_len)

            lowered = lower_at(config)
            report["model_flops_per_step"] = 2.0 * (config.num_params() - config.vocab_size * config.hidden_size) \
                * batch_size
        else:
            raise ValueError(f"--step must be train or decode, got {step!r}")
        compiled = lowered.compile()
    except Exception as e:  # the compiler's own verdict when the program does not fit
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "exceeds available HBM" not in message:
            raise
        report.update(fits=False, reason=_first_line_with(message, "HBM") or message.splitlines()[0],
                      compile_s=round(time.perf_counter() - t0, 1), per_device_bytes=None, flops_per_step=None)
        report.setdefault("model_flops_per_step", model_flops_per_step(config, batch_size, seq_len))
        needed = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
        if needed:
            report["required_temp_bytes"] = int(float(needed.group(1)) * GIB)
            report["hbm_bytes"] = int(float(needed.group(2)) * GIB)
        return report
    m = compiled.memory_analysis()
    per_device = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else None
    report.update(
        per_device_bytes=int(per_device),
        argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
        fits=bool(per_device <= s.hbm_per_device),
        # cost_analysis counts one device's program (the step's total is that times the devices) and
        # counts a loop body once, not per iteration: with scanned layers it undercounts by ~layers.
        flops_per_step=None if flops is None else flops * len(devices),
        flops_note="compiler cost_analysis × devices; a scanned loop body counts once",
        # Pallas (Mosaic) kernel calls per run of the program (a scanned loop's body once): the splash
        # attention's, forward and backward. (Counted in the lowered module: the compiled one's text
        # fails to print for some v5p programs.)
        mosaic_kernels=len(mosaic_calls(lowered.as_text())),
        compile_s=round(time.perf_counter() - t0, 1),
    )
    if not report["fits"]:
        report["reason"] = (f"needs {per_device / GIB:.2f} GiB per device (arguments + outputs + temporaries − "
                            f"aliased), the device has {s.hbm_per_device / GIB:.2f} GiB")
    elif step == "decode":  # the other program of slot decoding: one prompt prefilled into a slot
        from lima_jax import decoding

        prompt_len = min(decoding.prompt_bucket(seq_len // 2), seq_len)
        m = decoding.lower_prefill_slot(config, mesh, rules, batch_size, seq_len, prompt_len).compile().memory_analysis()
        prefill = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        report.update(prefill_prompt_len=prompt_len, prefill_bytes_per_device=int(prefill))
        report["fits"] = bool(prefill <= s.hbm_per_device)
        if not report["fits"]:
            report["reason"] = f"the prefill of {prompt_len} tokens needs {prefill / GIB:.2f} GiB per device"
    if report["fits"] and predict and (s.topology != "cpu" or step == "train"):
        if s.topology == "cpu":
            report.update(measure_step(compiled, abstract_args))
        else:
            report.update(predict_by_depth(lambda d: lower_at(config.replace(num_layers=d, scan_layers=False)),
                                           config.num_layers, cost_model_peak(devices[0]),
                                           PREDICT_COMPILER_OPTIONS.get(s.name.split("-")[0])))
        step_s, peak = report["predicted_step_s"], chip_peak_flops(s)
        report["predicted_mfu"] = report["model_flops_per_step"] / (step_s * s.chips * peak) if peak and step_s else None
        tokens = rows * seq_len if step == "train" else batch_size  # computed tokens (train) / new tokens (decode)
        report["predicted_tokens_per_s_per_chip"] = tokens / step_s / s.chips if step_s else None
        report["compile_s"] = round(time.perf_counter() - t0, 1)
    return report


def _first_line_with(text: str, needle: str) -> Optional[str]:
    return next((line.strip() for line in text.splitlines() if needle in line), None)


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / GIB:.1f} GiB"


def _percent(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def write_json(path: str, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def describe(report: dict) -> str:
    verdict = "FITS" if report["fits"] else "DOES NOT FIT"
    rows = f", {report['rows']} rows of {report['seq_len']} ({report['rows_from']})" if "rows" in report else ""
    lines = [f"{report['model']} {report['step']} step on {report['topology']} ({report['n_devices']} devices, "
             f"mesh {report['mesh']}{rows}): {verdict}",
             f"  per device: {_gib(report.get('per_device_bytes'))} of {_gib(report['hbm_bytes'])} HBM; "
             f"compile {report['compile_s']} s"]
    if report.get("flops_per_step"):
        lines.append(f"  flops/step {report['flops_per_step']:.3e} (compiler), model flops/step "
                     f"{report['model_flops_per_step']:.3e}")
    if report.get("prefill_bytes_per_device"):
        lines.append(f"  prefill of a {report['prefill_prompt_len']}-token prompt into a slot: "
                     f"{_gib(report['prefill_bytes_per_device'])} per device")
    if report.get("prediction_note"):
        lines.append(f"  predicted: none ({report['prediction_note']}; {report['prediction_method']})")
    if report.get("predicted_step_s"):
        unit = "tokens computed" if report["step"] == "train" else "new tokens"
        lines.append(f"  predicted: {report['predicted_step_s']:.4g} s/step, MFU "
                     f"{_percent(report['predicted_mfu'])}, {report['predicted_tokens_per_s_per_chip']:,.0f} {unit}/s "
                     f"per chip, {_gib(report.get('predicted_bytes_per_device'))} moved per device per step "
                     f"({report['prediction_method']}; remat {report['remat']}, attention {report['attention_kernel']})")
    if not report["fits"]:
        lines.append(f"  reason: {report.get('reason')}")
    return "\n".join(lines)


# ---- the sharding of every parameter, for review ---------------------------------------------------
def param_partition_specs(config, mesh_shape: dict, rules) -> dict[str, list]:
    """{"layers/attn/q_proj": [None, "fsdp", "tensor", None], ...}: where each parameter lives on a mesh
    of `mesh_shape`, computed from the logical names and rules alone (abstract devices; no libtpu)."""
    from flax import nnx
    from jax.sharding import AbstractMesh

    from lima_jax.model import Llama, param_logical_names
    from lima_jax.sharding import logical_to_spec

    mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    model = nnx.eval_shape(lambda: Llama(config))
    shapes = {tuple(str(p) for p in path): v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for path, names in sorted(param_logical_names(model).items()):
        spec = logical_to_spec(names, rules, mesh, shapes[path])
        out["/".join(path)] = [list(e) if isinstance(e, tuple) else e for e in spec]
    return out


def golden_specs(model: str = "llama_65b", slice_name: str = "v4-256", batch_size: int = 32) -> dict:
    """The partition specs of `model` as lima-aot would train it on `slice_name` (default mesh)."""
    from lima_jax import mesh as mesh_lib

    _, config, _ = _configure(model, batch_size, 2048, None, [])
    rules, _ = mesh_lib.logical_rules()
    mesh_shape = default_mesh(get_slice(slice_name).devices, batch_size)
    return {"model": model, "slice": slice_name, "mesh": mesh_shape,
            "specs": param_partition_specs(config, mesh_shape, rules)}
