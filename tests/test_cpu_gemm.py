"""cpu_gemm.py: BLAS products (MKL or OpenBLAS) as XLA custom calls equal XLA's dots, attention's fused
calls equal the XLA version, and only one-device CPU programs use them. This process uses the default
BLAS; a subprocess runs the product tests with the other one."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import attention, cpu_gemm

TARGET = "@lima_jax_sgemm_batch_strided("  # how the product's call appears in lowered StableHLO


def _custom_calls(fn, *args, target: str = TARGET) -> int:
    return jax.jit(fn).lower(*args).as_text().count(target)


@pytest.mark.parametrize("batch", [1, 5])  # one matrix: split by rows; several: split by matrix
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("b_rows,accumulate", [(None, False), (7, False), (7, True)])
def test_blas_product_equals_xla_dot(batch, transpose_a, transpose_b, b_rows, accumulate):
    rng = np.random.default_rng(0)
    m, k, n, rows = 9, 11 if b_rows is None else b_rows, 6, 13
    a = rng.standard_normal((batch, k, m) if transpose_a else (batch, m, k)).astype(np.float32)
    b_shape = (batch, n, k) if transpose_b else (batch, k, n)
    if b_rows is not None:  # only the first b_rows rows of b are read: fill the rest with garbage
        b_shape = (batch, rows, k) if transpose_b else (batch, rows, n)
    b = rng.standard_normal(b_shape).astype(np.float32)
    if b_rows is not None and transpose_b:
        n = b_rows
    acc = rng.standard_normal((batch, m + 4, n)).astype(np.float32) if accumulate else None

    def product(a, b, acc, blas):
        return cpu_gemm.batched_matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, b_rows=b_rows,
                                       accumulate=acc, blas=blas)

    expected = jax.jit(product, static_argnums=3)(a, b, acc, False)
    got = jax.jit(product, static_argnums=3)(a, b, acc, True)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert _custom_calls(lambda a, b, acc: product(a, b, acc, True), a, b, acc) == 1
    assert _custom_calls(lambda a, b, acc: product(a, b, acc, False), a, b, acc) == 0


def test_non_float32_products_stay_xla_dots():
    a = jnp.ones((2, 4, 8), jnp.bfloat16)
    assert _custom_calls(lambda a: cpu_gemm.batched_matmul(a, a, transpose_b=True, blas=True), a) == 0


def test_mismatched_shapes_are_refused():
    a = jnp.ones((2, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match="do not multiply"):
        cpu_gemm.batched_matmul(a, a, blas=True)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_through_blas_matches_xla_values_and_gradients(transpose_w):
    """The LM head's product: x @ w (or x @ wᵀ, tied embeddings) and both gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((9, 6) if transpose_w else (6, 9)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((10, 9)), jnp.float32)

    def make(blas):
        return jax.value_and_grad(lambda x, w: jnp.sum(cpu_gemm.matmul(x, w, transpose_w=transpose_w, blas=blas) * g),
                                  argnums=(0, 1))

    assert _custom_calls(lambda x, w: cpu_gemm.matmul(x, w, transpose_w=transpose_w, blas=True), x, w) == 1
    assert _custom_calls(make(True), x, w) == 3  # the product, then the gradients of x and of w
    assert _custom_calls(make(False), x, w) == 0
    for got, expected in zip(jax.tree.leaves(jax.jit(make(True))(x, w)), jax.tree.leaves(jax.jit(make(False))(x, w))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    bf16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert _custom_calls(make(True), *bf16) == 0  # not float32: XLA's dot and autodiff


@pytest.mark.parametrize("h,kvh", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [64, 37, 200])  # 3 blocks, the last partial; 5 blocks; one block
def test_fused_attention_matches_xla_values_and_gradients(h, kvh, block, monkeypatch):
    """Our fused calls (forward and backward) equal the XLA version, with left and right padding; rows
    that see no key are padding (their outputs differ) and are left out. Repeated runs are bitwise
    equal."""
    monkeypatch.setattr(attention, "FUSED_BLOCK", block)
    b, t, d = 3, 150, 24  # d: not a multiple of the row loops' 16 lanes
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)) * 2, jnp.float32) for n in (h, kvh, kvh))
    real = np.ones((b, t), bool)
    real[0, :5] = False  # left padding: rows 0-4 see no key
    real[1, -20:] = False  # right padding
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & jnp.asarray(real)[:, None, :]
    sees_a_key = np.asarray(jnp.any(mask, axis=-1))[:, :, None, None]
    w = jnp.asarray(rng.standard_normal((b, t, h, d)) * sees_a_key, jnp.float32)

    def make(on):
        def loss(q, k, v):
            with cpu_gemm.enabled(on):  # inside the traced function, as lima-train's step enters it
                out = attention.causal_attention(q, k, v, mask, block=block)
            return jnp.sum(out * w), out * sees_a_key
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    for name, expected in (("attention_forward", 1), ("attention_backward", 1), ("sgemm_batch_strided", 0)):
        assert _custom_calls(make(True), q, k, v, target=f"@lima_jax_{name}(") == expected, name
    assert _custom_calls(make(False), q, k, v, target="@lima_jax_") == 0
    fused = jax.jit(make(True))
    got = jax.tree.leaves(fused(q, k, v))
    for name, a, e in zip(["loss", "out", "dq", "dk", "dv"], got, jax.tree.leaves(jax.jit(make(False))(q, k, v))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-4, err_msg=name)
    assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree.leaves(fused(q, k, v))))


def test_only_one_device_cpu_meshes_use_the_blas():
    cpu = jax.devices("cpu")[0]
    assert cpu_gemm.available()  # OpenBLAS and our C call are dependencies: their absence is a broken install
    assert cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([cpu])))
    assert not cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([cpu] * 8)))  # sharded
    tpu = types.SimpleNamespace(platform="tpu")
    assert not cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([tpu], dtype=object)))


def test_train_step_on_one_cpu_device_runs_its_products_through_the_blas():
    from lima_jax import mesh as mesh_lib, sharding, train
    from lima_jax.config import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         max_position_embeddings=64, dtype="float32")
    recipe = train.Recipe(1, 2, 16, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = train.build_train_step(config, recipe, mesh, sharding.DEFAULT_RULES, ())
    compiled = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile().as_text()
    # The layers are one scanned body: attention's two fused calls; the LM head 3 products; with MKL also
    # the 7 projections, each forward and 2 gradients.
    projections = 7 * 3 if cpu_gemm.backend() == "mkl" else 0
    assert config.scan_layers
    calls = {"sgemm_batch_strided": 3 + projections, "attention_forward": 1, "attention_backward": 1}
    for name, expected in calls.items():
        assert compiled.count(f'custom_call_target="lima_jax_{name}"') == expected, name


def test_backend_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.delenv(cpu_gemm.BACKEND_ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "_torch_library", lambda: "/some/libtorch_cpu.so")
    monkeypatch.setattr(cpu_gemm, "_intel_cpu", lambda: True)
    assert cpu_gemm.blas_backend() == "mkl"
    monkeypatch.setattr(cpu_gemm, "_intel_cpu", lambda: False)  # MKL was no faster on an AMD EPYC
    assert cpu_gemm.blas_backend() == "openblas"
    monkeypatch.setattr(cpu_gemm, "_intel_cpu", lambda: True)
    monkeypatch.setattr(cpu_gemm, "_torch_library", lambda: None)
    assert cpu_gemm.blas_backend() == "openblas"
    for value in ("mkl", "OpenBLAS", "xla"):
        monkeypatch.setenv(cpu_gemm.BACKEND_ENV, value)
        assert cpu_gemm.blas_backend() == value.lower()
    monkeypatch.setenv(cpu_gemm.BACKEND_ENV, "atlas")
    with pytest.raises(ValueError, match="LIMA_JAX_CPU_BLAS='atlas': expected mkl, openblas or xla"):
        cpu_gemm.blas_backend()


@pytest.mark.parametrize("batch", [1, 23])  # rows split (or MKL's own threads); matrices in pieces
def test_products_are_bitwise_repeatable_also_from_two_threads_at_once(batch):
    """The pieces do not depend on which thread runs them, nor on a second call at the same time."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((batch, 301, 70)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((batch, 70, 129)), jnp.float32)
    product = jax.jit(lambda a, b: cpu_gemm.batched_matmul(a, b, blas=True))
    first = np.asarray(product(a, b))
    np.testing.assert_allclose(first, np.matmul(np.asarray(a), np.asarray(b)), rtol=1e-4, atol=1e-4)
    results = []

    def repeat():
        results.extend(np.asarray(product(a, b)) for _ in range(10))

    threads = [threading.Thread(target=repeat) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(np.array_equal(r, first) for r in results)


def test_the_other_backend_passes_the_product_tests():
    """This process has the default BLAS; the other one (MKL needs torch, a test dependency) runs the
    product tests in a subprocess."""
    other = "openblas" if cpu_gemm.backend() == "mkl" else "mkl"
    env = {**os.environ, cpu_gemm.BACKEND_ENV: other}
    tests = "product_equals or matmul_through or fused_attention or repeatable or runs_its_products"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
