"""tools/gpu_check.py: its dry run (every check, small shapes, on the CPU) passes where gin, seqio and
TensorFlow cannot be imported, one line per check; a failing or crashing check fails the run; and the
pieces it measures with (packed batches, the GPU peak table)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_check  # noqa: E402

CHECKS = ["parity", "attention", "train", "decode_fixed", "decode_lima", "budget"]
BLOCKED = ("gin", "seqio", "tensorflow", "tensorflow_datasets", "tensorflow_text")
# None in sys.modules: `import gin` raises ImportError and importlib.util.find_spec("gin") says None, as
# on a machine where it is not installed.
_RUN = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
try:
    import gin
except ImportError:
    pass
else:
    raise SystemExit("the blocker let gin through")
sys.argv = ["gpu_check.py", "--dry-run"]
runpy.run_path({os.path.join(ROOT, "tools", "gpu_check.py")!r}, run_name="__main__")
"""


def test_dry_run_passes_every_check_without_gin_seqio_or_tensorflow():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_PLATFORMS", None)  # --dry-run chooses the CPU itself
    proc = subprocess.run([sys.executable, "-c", _RUN], env=env, cwd="/", capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    assert [line[len("check "):].split(":")[0] for line in lines] == CHECKS, out
    assert all(line.split(": ", 1)[1].startswith("ok ") for line in lines), out


def _keep_environment(monkeypatch):
    """main sets these for the process; restore them after the test."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false"))


def test_a_failing_or_crashing_check_fails_the_run(monkeypatch, capsys):
    _keep_environment(monkeypatch)
    monkeypatch.setattr(gpu_check, "PARITY_TOL", 0.0)  # no float32 model matches to 0

    def crash(sizes, platform):
        raise RuntimeError("attention broke\nsecond line")

    monkeypatch.setattr(gpu_check, "check_attention", crash)
    assert gpu_check.main(["--dry-run", "--only", "parity", "attention"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check ")]
    assert lines[0].startswith("check parity: FAIL max_abs_diff=") and "(tol 0;" in lines[0]
    assert lines[1].startswith("check attention: FAIL RuntimeError: attention broke time_s=")
    assert lines[2].startswith("check budget: ok")


def test_without_a_gpu_the_real_run_says_so(monkeypatch, capsys):
    _keep_environment(monkeypatch)
    assert gpu_check.main([]) == 1
    assert "check platform: FAIL jax sees cpu" in capsys.readouterr().out


def test_packed_batch_fills_rows_with_whole_examples():
    batch = gpu_check.packed_batch(4, 512, 100, np.random.default_rng(0))
    ids, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    assert ids.shape == (4, 512) and (ids > 0).mean() > 0.7  # a packed step is mostly real tokens
    assert (ids.max(axis=1) >= 2).any()  # several examples share a row
    for row in range(4):
        for s in set(ids[row]) - {0}:
            where = np.flatnonzero(ids[row] == s)
            assert (np.diff(where) == 1).all() and (positions[row, where] == np.arange(len(where))).all()
    assert ((batch["decoder_loss_weights"] > 0) == (ids > 0)).all()


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_peak_is_the_published_bf16_figure_of_the_gpu():
    assert gpu_check.peak_flops("gpu", [_Device("NVIDIA H100 80GB HBM3")])[0] == 989.4e12
    assert gpu_check.peak_flops("gpu", [_Device("NVIDIA H100 PCIe")] * 2)[0] == 2 * 756e12
    assert gpu_check.peak_flops("gpu", [_Device("NVIDIA H200")] * 8)[0] == 8 * 989.4e12
    assert gpu_check.peak_flops("gpu", [_Device("NVIDIA A100-SXM4-80GB")])[0] == 312e12
    peak, source = gpu_check.peak_flops("gpu", [_Device("Tesla T4")])
    assert peak == 0 and "no published peak" in source
