"""cpu_gemm.py: OpenBLAS batched products as XLA custom calls equal XLA's dots, and only one-device CPU
programs use them."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import attention, cpu_gemm

TARGET = "@lima_jax_sgemm_batch_strided"  # how the custom call appears in lowered StableHLO


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count(TARGET)


@pytest.mark.parametrize("batch", [1, 5])  # one matrix: split by rows; several: split by matrix
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("b_rows,accumulate", [(None, False), (7, False), (7, True)])
def test_openblas_product_equals_xla_dot(batch, transpose_a, transpose_b, b_rows, accumulate):
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
def test_matmul_through_openblas_matches_xla_values_and_gradients(transpose_w):
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


def test_attention_through_openblas_matches_xla_values_and_gradients():
    """Grouped heads, a partial last block and left padding: the custom-call attention (forward and
    hand-written backward) equals the XLA one."""
    b, t, h, kvh, d = 2, 150, 4, 2, 8
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for n in (h, kvh, kvh))
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0).at[0, :, :5].set(False)

    def make(on):
        def loss(q, k, v):
            with cpu_gemm.enabled(on):  # inside the traced function, as lima-train's step enters it
                return jnp.sum(attention.causal_attention(q, k, v, mask, block=64) * w)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    assert _custom_calls(make(True), q, k, v) == 3 * 2 + 3 * 5  # 3 blocks: 2 products forward, 5 backward
    assert _custom_calls(make(False), q, k, v) == 0
    for got, expected in zip(jax.tree.leaves(jax.jit(make(True))(q, k, v)),
                             jax.tree.leaves(jax.jit(make(False))(q, k, v))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_only_one_device_cpu_meshes_use_openblas():
    cpu = jax.devices("cpu")[0]
    assert cpu_gemm.available()  # the wheel is a dependency: its absence would be a broken install
    assert cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([cpu])))
    assert not cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([cpu] * 8)))  # sharded
    tpu = types.SimpleNamespace(platform="tpu")
    assert not cpu_gemm.usable_on(types.SimpleNamespace(devices=np.array([tpu], dtype=object)))


def test_train_step_on_one_cpu_device_runs_attention_and_head_through_openblas():
    from lima_jax import mesh as mesh_lib, sharding, train
    from lima_jax.config import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         max_position_embeddings=64, dtype="float32")
    recipe = train.Recipe(1, 2, 16, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = train.build_train_step(config, recipe, mesh, sharding.DEFAULT_RULES, ())
    compiled = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile().as_text()
    # The layers are one scanned body: one attention block, 2 products forward, 5 backward; the LM head 3.
    assert config.scan_layers and compiled.count(f'custom_call_target="{TARGET[1:]}"') == 7 + 3


def test_workers_share_pieces_so_a_late_helper_leaves_its_share_to_the_caller():
    """Pieces go to whichever thread is free: while the helper is held up, the calling thread takes
    every other piece (with a fixed half per thread it would do one and wait). Each piece runs once."""
    import threading
    import time

    workers = cpu_gemm._Workers(2)
    caller = threading.get_ident()
    done_by, caller_pieces = {}, []
    all_but_one = threading.Event()
    deadline = time.monotonic() + 10

    def piece(i):
        if threading.get_ident() == caller:
            caller_pieces.append(i)
            if len(caller_pieces) == len(jobs) - 1:
                all_but_one.set()
        else:  # a helper held up until the caller has done all pieces but this one (at most 10 s)
            all_but_one.wait(max(0.0, deadline - time.monotonic()))
        done_by.setdefault(i, []).append(threading.get_ident())

    jobs = [(i,) for i in range(8)]
    workers.run(piece, jobs)
    assert sorted(done_by) == list(range(8)) and all(len(t) == 1 for t in done_by.values())
    assert len(caller_pieces) >= 7
