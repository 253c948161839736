"""lima_jax/plan.py (lima-aot --plan): candidates, the choice, and a plan gin file lima-train runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lima_jax import plan
from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
FAKE_GIN = os.path.join(ROOT, "tests", "train_fake.gin")


def test_mesh_splits_keep_whole_kv_heads_and_split_the_batch():
    assert plan.mesh_splits(8, 32, 8) == [{"data": 1, "fsdp": 8 // t, "tensor": t} for t in (1, 2, 4, 8)]
    assert plan.mesh_splits(4, 32, 2) == [{"data": 1, "fsdp": 4, "tensor": 1}, {"data": 1, "fsdp": 2, "tensor": 2}]
    # v4-256 and LLaMA-65B (64 kv heads): FSDP may not exceed the batch's 32 rows
    assert plan.mesh_splits(256, 32, 64) == [{"data": 1, "fsdp": 32, "tensor": 8}, {"data": 1, "fsdp": 16, "tensor": 16}]


def _report(step_s, fits=True, remat="full", fsdp=8, micro=1):
    return {"fits": fits, "predicted_step_s": step_s if fits else None, "remat": remat, "microbatches": micro,
            "mesh": {"data": 1, "fsdp": fsdp, "tensor": 8 // fsdp}, "predicted_mfu": 0.5 if fits else None,
            "prediction_method": "test", "rows": 8, "per_device_bytes": 1}


def test_the_plan_is_the_fastest_candidate_that_fits(monkeypatch):
    reports = iter([_report(None, fits=False), _report(2.0, micro=2), _report(1.0, remat="none"),
                    _report(3.0, fsdp=4), _report(0.5, fsdp=4, remat="none")])
    monkeypatch.setattr(plan.aot, "compile_step", lambda *a, **k: dict(next(reports)))
    result = plan.plan("tiny", "v4-8", 16, 64, remats=("full", "none"), microbatches=(1, 2),
                       meshes=[{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2}], log=lambda s: 0)
    assert len(result["candidates"]) == 5  # (8, full) needed 2 microbatches; the others fit at 1
    assert result["best"]["predicted_step_s"] == 0.5
    text = plan.plan_gin(result)
    assert "model_config.remat_policy = 'none'" in text and "make_mesh.fsdp = 4" in text
    assert "make_mesh.tensor = 2" in text and "recipe.grad_accum_steps = 1" in text
    assert "**(plan)**" in plan.candidates_table(result)
    with pytest.raises(ValueError, match="nothing fits"):
        plan.plan_gin({**result, "best": None})


def test_plan_on_8_cpu_devices_writes_a_gin_file_lima_train_runs(tmp_path):
    """The fast path: the tiny model on this machine's 8 CPU devices (steps measured), then lima-train
    with the plan on 8 devices."""
    gin_out, json_out = tmp_path / "plan.gin", tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([os.path.join(BIN, "lima-aot"), "--plan", "--model", "tiny", "--topology", "cpu-8",
                           "--batch_size", "8", "--seq_len", "32", "--remats", "full,none", "--out", str(gin_out),
                           "--json", str(json_out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(json_out.read_text())
    assert len(result["candidates"]) == 4 and all(c["fits"] for c in result["candidates"])  # 2 meshes × 2 remats
    best = result["best"]
    assert best["predicted_step_s"] == min(c["predicted_step_s"] for c in result["candidates"])
    assert f"make_mesh.fsdp = {best['mesh']['fsdp']}" in gin_out.read_text()
    model_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "lima_jax.cli.train", f"--gin_file={FAKE_GIN}",
                            f"--gin_file={gin_out}", f"--model_dir={model_dir}", "--gin_bindings=NUM_EPOCHS=1"],
                           env=dict(env, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert f"mesh {best['mesh']}" in train.stdout
    operative = (model_dir / "operative_config.gin").read_text()
    assert f"remat_policy = '{best['remat']}'" in operative


def test_without_predictions_the_plan_is_the_first_candidate_that_fits(monkeypatch):
    reports = iter([_report(None, fits=False), {**_report(1.0), "predicted_step_s": None, "prediction_note": "x"},
                    {**_report(1.0, remat="none"), "predicted_step_s": None, "prediction_note": "x"}])
    monkeypatch.setattr(plan.aot, "compile_step", lambda *a, **k: dict(next(reports)))
    result = plan.plan("tiny", "v4-8", 8, 64, remats=("full", "none"), microbatches=(1, 2),
                       meshes=[{"data": 1, "fsdp": 4, "tensor": 2}], log=lambda s: 0)
    assert result["best"]["remat"] == "full" and result["best"]["microbatches"] == 2
    assert "not predicted (x)" in plan.plan_gin(result)
