"""lima-aot --plan: the fastest LIMA train step that fits a slice, as the TPU compiler sees it.

Candidates are remat policy × mesh split (FSDP over `fsdp` devices, tensor parallelism over the
rest) × microbatches. Each is compiled as lima-train would run it (`aot.compile_step`); for each
(mesh, remat) more microbatches are tried only while the step does not fit, since they only trade
speed for memory. Every candidate that fits gets the compiler's predicted step time (on CPU devices:
measured); the plan is the fastest, written as a gin file that lima-train takes after the model,
mesh and run files (`--gin_file=plan.gin`). The step always holds the recipe's examples, so the
fastest step is the fastest run.
"""
from __future__ import annotations

import datetime
from typing import Callable, Optional, Sequence

from lima_jax import aot
from lima_jax.atomic import atomic_write_text

# Remat policies worth comparing for LLaMA (config.REMAT_POLICIES has them all): recompute everything,
# keep the attention inputs/outputs, also keep the MLP input, keep every matmul's output (recompute
# only norms and SwiGLU's product), keep everything.
PLAN_REMATS = ("full", "qkv_attn", "qkv_attn_mlp_in", "qkv_attn_proj_gate_up", "none")
PLAN_MICROBATCHES = (1, 2, 4)
MAX_TENSOR = 16  # tensor parallelism beyond this spends more on all-reduces than it saves


def mesh_splits(n_devices: int, batch_size: int, num_kv_heads: int) -> list[dict]:
    """Meshes {data: 1, fsdp, tensor} over n_devices: tensor divides the kv heads (every device keeps
    whole heads), fsdp divides the batch; most FSDP first."""
    out = []
    for tensor in range(1, min(n_devices, MAX_TENSOR) + 1):
        fsdp = n_devices // tensor
        if n_devices % tensor or num_kv_heads % tensor or batch_size % fsdp:
            continue
        out.append({"data": 1, "fsdp": fsdp, "tensor": tensor})
    return out


def _mesh_text(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def plan(model: str, slice_name: str, batch_size: int = 32, seq_len: int = 2048,
         remats: Sequence[str] = PLAN_REMATS, microbatches: Sequence[int] = PLAN_MICROBATCHES,
         meshes: Optional[list[dict]] = None, extra_gin: Sequence[str] = (), log: Callable = print,
         rows: Optional[int] = None) -> dict:
    """{"candidates": [report, ...], "best": the fastest report that fits, or None}. rows: the step's
    rows (default: the packed bucket a LIMA run takes most on each candidate's mesh, `aot.packed_rows`)."""
    s = aot.get_slice(slice_name)
    _, config, _ = aot._configure(model, batch_size, seq_len, None, list(extra_gin))
    meshes = meshes or mesh_splits(s.devices, batch_size, config.num_kv_heads)
    if not meshes:
        raise ValueError(f"no mesh of {s.devices} devices splits batch {batch_size} and {config.num_kv_heads} kv heads")
    candidates = []
    for mesh in meshes:
        for remat in remats:
            for micro in microbatches:
                if batch_size % (mesh["fsdp"] * mesh["data"] * micro):
                    continue
                report = aot.compile_step(model, slice_name, _mesh_text(mesh), batch_size, seq_len, remat, "train",
                                          [*extra_gin, f"recipe.grad_accum_steps={micro}"], rows=rows)
                report["microbatches"] = micro
                candidates.append(report)
                log(f"  {_mesh_text(mesh)} remat={remat} microbatches={micro}: " + _verdict(report))
                if report["fits"]:
                    break
    predicted = [c for c in candidates if c["fits"] and c.get("predicted_step_s")]
    fitting = [c for c in candidates if c["fits"]]
    # Without any prediction (the cost model failed), the first that fits: most FSDP, least remat tried first.
    best = min(predicted, key=lambda c: c["predicted_step_s"]) if predicted else (fitting[0] if fitting else None)
    return {"model": model, "topology": slice_name, "batch_size": batch_size, "seq_len": seq_len,
            "candidates": candidates, "best": best}


def _verdict(report: dict) -> str:
    if not report["fits"]:
        return f"does not fit ({aot._gib(report.get('per_device_bytes'))})"
    if not report.get("predicted_step_s"):
        return f"fits ({aot._gib(report['per_device_bytes'])}), no prediction: {report.get('prediction_note')}"
    return (f"fits ({aot._gib(report['per_device_bytes'])}), {report['predicted_step_s']:.4g} s/step, "
            f"MFU {aot._percent(report['predicted_mfu'])}")


def candidates_table(result: dict) -> str:
    """The candidates as a markdown table, the chosen one marked."""
    head = ("| mesh | remat | microbatches | rows | per device | fits | step s | MFU | tokens/s/chip |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for c in result["candidates"]:
        chosen = " **(plan)**" if c is result["best"] else ""
        step = f"{c['predicted_step_s']:.4g}" if c.get("predicted_step_s") else "-"
        tokens = f"{c['predicted_tokens_per_s_per_chip']:,.0f}" if c.get("predicted_tokens_per_s_per_chip") else "-"
        lines.append(f"| {_mesh_text(c['mesh'])}{chosen} | {c['remat']} | {c['microbatches']} | {c.get('rows', '-')} | "
                     f"{aot._gib(c.get('per_device_bytes'))} | {'yes' if c['fits'] else 'no'} | {step} | "
                     f"{aot._percent(c.get('predicted_mfu'))} | {tokens} |")
    return "\n".join(lines)


def plan_gin(result: dict) -> str:
    """The chosen candidate as gin bindings lima-train takes after the model, mesh and run files."""
    best = result["best"]
    if best is None:
        raise ValueError(f"nothing fits {result['model']} on {result['topology']}: no plan to write")
    mesh = best["mesh"]
    return (f"# lima-aot --plan for {result['model']} on {result['topology']} (batch {result['batch_size']} × "
            f"{result['seq_len']}), {datetime.date.today().isoformat()}:\n"
            + (f"# predicted {best['predicted_step_s']:.4g} s/step, MFU {aot._percent(best.get('predicted_mfu'))} "
               f"({best['prediction_method']}). " if best.get("predicted_step_s") else
               f"# not predicted ({best.get('prediction_note')}): the first candidate that fits. ")
            + "Pass it after the other gin files.\n"
            f"model_config.remat_policy = '{best['remat']}'\n"
            f"recipe.grad_accum_steps = {best['microbatches']}\n"
            f"make_mesh.data = {mesh['data']}\n"
            f"make_mesh.fsdp = {mesh['fsdp']}\n"
            f"make_mesh.tensor = {mesh['tensor']}\n")


def write_plan_gin(path: str, result: dict) -> None:
    atomic_write_text(path, plan_gin(result))


# ---- the README table: the smallest slice that fits each model, and the plan's speed there ---------
TABLE_MODELS = ("llama_7b", "llama_13b", "llama_33b", "llama_65b")
TABLE_SLICES = {"v4": ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128", "v4-256", "v4-512"),
                "v5p": ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128")}


def smallest_fitting(model: str, slices: Sequence[str], batch_size: int, seq_len: int, log: Callable = print) -> dict:
    """Tries slices in increasing size with the default mesh and full remat; the first whose compiled
    step fits wins. The step has batch_size rows, the padded count: the largest step a packed run can
    take (its fallback bucket)."""
    for name in slices:
        report = aot.compile_step(model, name, batch_size=batch_size, seq_len=seq_len, rows=batch_size,
                                  remat="full", predict=False)
        log(f"  {model} on {name}: {'fits' if report['fits'] else 'does not fit'} "
            f"({aot._gib(report.get('per_device_bytes'))} per device; compile {report['compile_s']} s)")
        if report["fits"]:
            return report
    return {"model": model, "topology": None, "fits": False}


def fit_table(batch_size: int = 32, seq_len: int = 2048, models: Sequence[str] = TABLE_MODELS,
              log: Callable = print) -> str:
    """Per model and TPU generation: the smallest slice that fits, and the plan's predicted MFU and
    tokens/s per chip on it (many compiles: hours for the whole table)."""
    import libtpu

    rows = []
    for model in models:
        cells = []
        for slices in TABLE_SLICES.values():
            fit = smallest_fitting(model, slices, batch_size, seq_len, log)
            if not fit["fits"]:
                cells.append("none listed")
                continue
            best = plan(model, fit["topology"], batch_size, seq_len, log=log, rows=batch_size)["best"]
            speed = (f"MFU {aot._percent(best['predicted_mfu'])}, {best['predicted_tokens_per_s_per_chip']:,.0f} "
                     f"tokens/s/chip" if best.get("predicted_step_s") else "not predicted")
            cells.append(f"{fit['topology']} ({aot._gib(fit['per_device_bytes'])} / {aot._gib(fit['hbm_bytes'])}); "
                         f"plan: {_mesh_text(best['mesh'])}, remat {best['remat']}, {speed}")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    head = (f"Smallest slice that fits LIMA SFT (batch {batch_size} × {seq_len}, AdamW fp32 state, bf16 compute; "
            f"{batch_size} rows, the most a packed step takes; fit with full remat and FSDP over as many devices "
            f"as the batch has rows, tensor parallel over the rest), then the plan there (`lima-aot --plan`) "
            f"with its predicted MFU and tokens/s per chip; compiled by libtpu "
            f"{getattr(libtpu, '__version__', '?')} on {datetime.date.today().isoformat()} (per-device bytes / "
            "HBM per device):\n\n| model | v4 | v5p |\n|---|---|---|")
    return head + "\n" + "\n".join(rows) + "\n"
