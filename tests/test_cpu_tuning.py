"""cpu_tuning.py: CPU programs are compiled without YNNPACK; glibc keeps freed memory."""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lima_jax import cpu_tuning

YNN = '"__ynn_fusion"'  # how a YNNPACK fusion is marked in compiled HLO


def test_cpu_options_only_on_cpu():
    assert cpu_tuning.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert cpu_tuning.compiler_options("tpu") is None


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


def test_train_step_and_generate_are_compiled_without_ynnpack():
    from lima_jax import decoding, mesh as mesh_lib, sharding, train
    from lima_jax.config import LlamaConfig
    from lima_jax.language_model import LanguageModel, build_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         max_position_embeddings=64)
    recipe = train.Recipe(1, 2, 16, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = train.build_train_step(config, recipe, mesh, sharding.DEFAULT_RULES, ())
    assert YNN not in ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile().as_text()

    lm = LanguageModel(config, build_model(config))
    tokens, mask = decoding.left_pad([[3, 4, 5]])
    settings = decoding.Settings(jnp.float32(0.7), jnp.float32(0.9), jnp.float32(1.2), jnp.asarray([-1], jnp.int32))
    lowered = decoding._generate_jit.on(lm.platform()).lower(
        lm._graphdef, lm._state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray([4], jnp.int32),
        jax.random.key(0), settings, max_new_tokens=4, greedy=False, top_k=0, per_layer_weights=True)
    assert YNN not in lowered.compile().as_text()


@pytest.mark.skipif("glibc" not in " ".join(__import__("platform").libc_ver()), reason="mallopt is glibc's")
def test_keep_freed_memory_in_a_fresh_process():
    code = ("from lima_jax import cpu_tuning; import sys; "
            "sys.exit(0 if cpu_tuning.keep_freed_memory('cpu') and not cpu_tuning.keep_freed_memory('tpu') else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
