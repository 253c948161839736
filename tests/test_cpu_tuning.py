"""cpu_tuning.py: CPU programs are compiled without YNNPACK, train steps without the tree-reduction
rewrite; glibc keeps freed memory."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import cpu_tuning

YNN = '"__ynn_fusion"'  # how a YNNPACK fusion is marked in compiled HLO


def _float_reduce_windows(hlo: str) -> list:
    """The float reduce-windows of compiled HLO: what XLA's tree-reduction rewrite makes of a sum
    (the train step's integer cumsums of positions are reduce-windows too, of s32)."""
    return re.findall(r"= f32\[[^=]*? reduce-window\(", hlo)


def test_cpu_options_only_on_cpu():
    assert cpu_tuning.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert cpu_tuning.compiler_options("cpu", training=True) == {
        "xla_cpu_experimental_ynn_fusion_type": "", "xla_disable_hlo_passes": "tree_reduction_rewriter"}
    assert cpu_tuning.compiler_options("tpu") is None
    assert cpu_tuning.compiler_options("tpu", training=True) is None


def test_train_options_keep_sums_plain_reduces():
    def row_sums(x):
        return jnp.sum(jnp.exp(x), axis=-1)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 512)), jnp.float32)
    plain = jax.jit(row_sums, compiler_options=cpu_tuning.compiler_options("cpu"))
    train_options = jax.jit(row_sums, compiler_options=cpu_tuning.compiler_options("cpu", training=True))
    assert _float_reduce_windows(plain.lower(x).compile().as_text())  # the rewrite does happen by default
    assert not _float_reduce_windows(train_options.lower(x).compile().as_text())
    np.testing.assert_allclose(train_options(x), plain(x), rtol=1e-6)


def test_cpu_programs_have_no_ynnpack_fusions():
    def f(a, b):
        return jnp.tanh(a @ b)

    a = jnp.ones((64, 64))
    both = cpu_tuning.PlatformJit(f)
    default = both.on("tpu").lower(a, a).compile().as_text()  # the plain jit (compiled here for the CPU)
    tuned = both.on("cpu").lower(a, a).compile().as_text()
    assert YNN in default  # the check below can fail: XLA:CPU does use YNNPACK by default
    assert YNN not in tuned
    assert YNN not in jax.jit(f, compiler_options=cpu_tuning.compiler_options("cpu")).lower(a, a).compile().as_text()


def test_train_step_and_generate_are_compiled_without_ynnpack_the_step_without_tree_reductions():
    from lima_jax import decoding, mesh as mesh_lib, sharding, train
    from lima_jax.config import LlamaConfig
    from lima_jax.language_model import LanguageModel, build_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         max_position_embeddings=64)
    recipe = train.Recipe(1, 2, 16, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = train.build_train_step(config, recipe, mesh, sharding.DEFAULT_RULES, ())
    step_hlo = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile().as_text()
    assert YNN not in step_hlo
    assert not _float_reduce_windows(step_hlo)

    lm = LanguageModel(config, build_model(config))
    assert YNN not in decoding.lower_generate(lm, [[3, 4, 5]], 4).compile().as_text()


# Runs a program with a 128 MB temporary 16 times in a fresh process and prints the fewest MiB of pages
# that one of the last 4 runs faulted in. With the switch, the heap settles within ~10 runs: XLA asks
# for 64-byte-aligned blocks, which a freed block of the very same size cannot serve, until two freed
# blocks merge (a training run takes thousands of steps).
_FAULTS = """
import resource, sys
from lima_jax import cpu_tuning
import jax, jax.numpy as jnp
if sys.argv[1] == "one_heap":
    assert cpu_tuning.keep_freed_memory(one_heap=True)  # before the backend starts, as lima-train calls it
big = jax.jit(lambda x, y, v: (x[:, None] * y[None, :] + 1.0) @ v)
x, y, v = jnp.ones(8192), jnp.ones(4096), jnp.ones(4096)
faulted = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big(x, y, v).block_until_ready()
    faulted.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faulted[-4:]) * resource.getpagesize() / 2**20)
"""


def _last_run_faults_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


@pytest.mark.skipif("glibc" not in " ".join(__import__("platform").libc_ver()), reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_of_repeated_runs():
    # XLA runs programs on its own threads; unless they share the main heap, their big temporaries
    # are mapped and unmapped on every run, so every run faults its 128 MB in again.
    assert _last_run_faults_mib("default") > 100
    assert _last_run_faults_mib("one_heap") < 16


@pytest.mark.skipif("glibc" not in " ".join(__import__("platform").libc_ver()), reason="mallopt is glibc's")
def test_keep_freed_memory_changes_nothing_for_other_platforms():
    code = ("from lima_jax import cpu_tuning; import sys; "
            "sys.exit(0 if not cpu_tuning.keep_freed_memory('tpu', one_heap=True) "
            "and cpu_tuning.keep_freed_memory('cpu') else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
