"""setup.py's `cuda` extra: JAX's CUDA 12 plugin pinned to the very jax the package pins (checked here
from setup.py itself), and, marked slow (pip downloads the ~3 GB of NVIDIA wheels to resolve them),
`pip install --dry-run -e '.[cuda]'` resolving on this machine."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup() in setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def test_cuda_extra_pins_the_plugin_to_the_pinned_jax():
    kwargs = _setup_kwargs()
    pins = dict(r.split("==") for r in kwargs["install_requires"])
    assert pins["jax"] == pins["jaxlib"] == jax.__version__
    assert sorted(kwargs["extras_require"]["cuda"]) == sorted([
        f"jax-cuda12-plugin[with-cuda]=={jax.__version__}", f"jax-cuda12-pjrt=={jax.__version__}"])


@pytest.mark.slow
def test_pip_resolves_the_cuda_extra(tmp_path):
    """About 25 s here: pip 23.2 downloads each NVIDIA wheel (cuDNN alone 716 MB) to a temporary folder
    to read its metadata, then deletes it."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           "-e", ".[cuda]"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert resolved["jax-cuda12-plugin"] == resolved["jax-cuda12-pjrt"] == jax.__version__, resolved
    assert "nvidia-cudnn-cu12" in resolved, resolved
