"""lima_jax/demo.py (`make demo`): every stage runs and leaves what the next one and the user need."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_end_to_end_leaves_responses_and_hf_export(tmp_path):
    out = tmp_path / "demo"
    # A short version of `make demo` (1 epoch, short context and answers), in its own process as make runs it.
    proc = subprocess.run([sys.executable, "-m", "lima_jax.demo", "--out", str(out), "--epochs", "1",
                           "--max_len", "64", "--max_new_tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(r["response"], str) for r in rows)
    assert all(r["settings"]["top_p"] == 0.9 and r["settings"]["temperature"] == 0.7 for r in rows)
    hf = out / "hf"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))
    assert (out / "loss.png").stat().st_size > 0
    assert "max |logit diff|" in proc.stdout and "=== 6/6 summary ===" in proc.stdout
