"""lima-train: the recipe, the demo run, mesh parity, sharding, bit-exact resume after kill -9, two hosts.

The runs are shared (module fixtures): one uninterrupted 1-device run in this process is the reference
for the resumed run; one 8-fake-device run (subprocess: the device count is fixed at JAX import) is the
reference for the two-process run. All use tests/train_fake.gin (tiny model, float32, 3 epochs of 3
steps, batch 8 × 32, 2 microbatches, dropout on) on the ArrayInput of tests/train_fakes.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from lima_jax import gin_config, mesh as mesh_lib, model_dir as mdir, optimizer, recipe as recipe_lib, train_step
from lima_jax import train  # noqa: F401  (the loop's gin configurable: gin/runs/lima_sft.gin binds train.*)
from lima_jax.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GIN = os.path.join(ROOT, "tests", "train_fake.gin")
CPU8_GIN = os.path.join(ROOT, "gin", "meshes", "cpu_8.gin")
TOTAL_STEPS = 9  # 24 examples / batch 8 = 3 steps per epoch, 3 epochs


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _cmd(model_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "lima_jax.cli.train", f"--gin_file={FAKE_GIN}", f"--model_dir={model_dir}", *extra]


def _run(cmd, env, timeout=240):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _scalars(model_dir: str, tag: str) -> dict[int, float]:
    """One scalar's {step: value}, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(os.path.join(model_dir, mdir.TENSORBOARD), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _max_diff(a: dict, b: dict) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def _logits(config, params, tokens):
    from lima_jax.language_model import LanguageModel, build_model

    config = config.replace(dtype="float32", param_dtype="float32", residual_dropout=0.0)
    return LanguageModel(config, build_model(config, params)).logits(tokens)


TOKENS = np.random.default_rng(0).integers(3, 500, size=(2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def run_1dev(tmp_path_factory):
    """The uninterrupted reference run, in this process (one CPU device)."""
    assert jax.device_count() == 1, "the reference run expects this process to see one device"
    model_dir = str(tmp_path_factory.mktemp("one") / "run")
    assert train_cli.main([f"--gin_file={FAKE_GIN}", f"--model_dir={model_dir}"]) == 0
    return model_dir


@pytest.fixture(scope="module")
def run_8dev(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("eight") / "run")
    _run(_cmd(model_dir, f"--gin_file={CPU8_GIN}"), _env(8))
    return model_dir


# ---- the recipe ---------------------------------------------------------------------------------
def _parse(*files, bindings=()):
    gin_config.parse([os.path.join(ROOT, "gin", f) for f in files], list(bindings))


def test_lima_sft_recipe_has_the_papers_values():
    _parse("models/llama_65b.gin", "meshes/single.gin", "runs/lima_sft.gin",
           bindings=["INIT_CHECKPOINT='/ckpt'", "DATA_DIR='/data'", "TOKENIZER='/ckpt/tokenizer.model'"])
    r = recipe_lib.recipe()
    config = recipe_lib.model_config()
    operative = gin.operative_config_str()
    assert (r.b1, r.b2, r.weight_decay) == (0.9, 0.95, 0.1)
    assert (r.learning_rate, r.final_learning_rate, r.warmup_steps) == (1e-5, 1e-6, 0)
    assert (r.num_epochs, r.batch_size, r.max_len) == (15, 32, 2048)
    assert config.residual_dropout == 0.3 and config.num_layers == 80
    for line in ("NUM_EPOCHS = 15", "BATCH_SIZE = 32", "MAX_LEN = 2048",
                 "recipe.b1 = 0.9", "recipe.b2 = 0.95", "recipe.weight_decay = 0.1", "recipe.warmup_steps = 0",
                 "recipe.learning_rate = 1e-05", "recipe.final_learning_rate = 1e-06",
                 "model_config.residual_dropout = 0.3"):
        assert line in operative, f"operative config lacks {line!r}"
    assert gin.query_parameter("train.checkpoint_every_epoch") is True
    assert gin.query_parameter("MIXTURE/macro.value") == "lima_1k"
    # LR: 1e-5 at the first step, 1e-6 at the last, linear in between (LIMA: 1000 examples, batch 32).
    total = r.num_epochs * -(-1000 // r.batch_size)
    schedule = optimizer.learning_rate_schedule(r, total)
    assert float(schedule(0)) == pytest.approx(1e-5, rel=1e-6)
    assert float(schedule(total - 1)) == pytest.approx(1e-6, rel=1e-5)
    assert float(schedule(total // 2)) == pytest.approx(1e-5 + (1e-6 - 1e-5) * (total // 2) / (total - 1), rel=1e-5)
    # Residual dropout: 0 at the bottom layer, rising linearly to 0.3 at the top.
    rates = np.asarray(config.layer_dropout_rates())
    np.testing.assert_allclose(rates, 0.3 * np.arange(80) / 79, rtol=1e-12)
    gin.clear_config()


def test_layers_are_scanned_on_accelerators_and_unrolled_on_cpu():
    # An unset scan_layers follows the platform lima-train runs on; an explicit value always wins.
    assert recipe_lib.model_config(preset="tiny", platform="tpu").scan_layers is True
    assert recipe_lib.model_config(preset="tiny", platform="cpu").scan_layers is False
    assert recipe_lib.model_config(preset="tiny", platform="cpu", scan_layers=True).scan_layers is True
    _parse("models/llama_65b.gin", "meshes/single.gin", "runs/lima_sft.gin",
           bindings=["INIT_CHECKPOINT=None", "DATA_DIR=None", "TOKENIZER=None"])
    assert recipe_lib.model_config(platform="tpu").scan_layers is True  # what lima-aot compiles for pods
    gin.clear_config()


def test_optimizer_is_adamw_with_the_recipe(tmp_path):
    """One step of our optimizer equals optax.adamw's (no decay on norm scales)."""
    import optax

    r = optimizer.Recipe(1, 8, 32, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    params = {"w": np.ones((2, 2), np.float32), "norm": {"scale": np.ones(2, np.float32)}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    updates, _ = optimizer.make_optimizer(r, 10).update(grads, optimizer.make_optimizer(r, 10).init(params), params)
    ref, _ = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.1).update(
        grads["w"], optax.adamw(1e-5).init(params["w"]), params["w"])
    np.testing.assert_allclose(updates["w"], ref, rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], -1e-5 * np.ones(2), rtol=1e-4)  # Adam, no decay


def test_token_loss_is_masked_mean():
    logits = np.log(np.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]], np.float32))
    loss, correct, weight = train_step.token_loss(logits, np.asarray([[0, 2]]), np.asarray([[1.0, 0.0]]))
    assert float(loss / weight) == pytest.approx(-np.log(0.5), rel=1e-6)
    assert float(correct) == 1.0 and float(weight) == 1.0


def test_token_loss_counts_argmax_hits_as_correct():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 6))
    targets[:, ::2] = logits.argmax(-1)[:, ::2]  # half the positions are hits
    weights = rng.integers(0, 2, (3, 6)).astype(np.float32)
    _, correct, _ = train_step.token_loss(logits, targets, weights)
    assert float(correct) == float(np.sum((logits.argmax(-1) == targets) * weights)) > 0


def test_grad_norm_equals_optax():
    import optax

    rng = np.random.default_rng(0)
    grads = {"w": rng.standard_normal((64, 512)).astype(np.float32), "b": rng.standard_normal((3, 7)).astype(np.float32)}
    assert float(jax.jit(train_step.grad_norm)(grads)) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)


# ---- a run, its outputs, its resume -------------------------------------------------------------
def test_run_trains_checkpoints_per_epoch_and_saves_operative_config(run_1dev):
    steps = mdir.list_checkpoint_steps(run_1dev)
    assert steps == [3, 6, 9]
    assert mdir.epoch_steps(run_1dev) == {1: 3, 2: 6, 3: 9}
    operative = open(os.path.join(run_1dev, mdir.OPERATIVE_CONFIG)).read()
    assert "NUM_EPOCHS = 3" in operative and "recipe.grad_accum_steps = 2" in operative
    loss = _scalars(run_1dev, "loss")
    assert sorted(loss) == list(range(1, TOTAL_STEPS + 1))
    assert np.mean([loss[s] for s in (7, 8, 9)]) < np.mean([loss[s] for s in (1, 2, 3)]) - 0.3, loss
    lr = _scalars(run_1dev, "lr")
    assert lr[1] == pytest.approx(3e-3) and lr[TOTAL_STEPS] == pytest.approx(3e-4)
    for tag in ("accuracy", "grad_norm", "tokens_per_s", "step_time_s"):
        assert len(_scalars(run_1dev, tag)) == TOTAL_STEPS
    # lima_jax.load_pretrained(model_dir) gives the latest params.
    import lima_jax

    config, params = mdir.restore_params(run_1dev)
    assert config.attention_kernel is None  # the loader's platform picks the kernel, not the trainer's
    lm = lima_jax.load_pretrained(run_1dev)
    np.testing.assert_allclose(lm.logits(TOKENS), _logits(config, params, TOKENS), atol=1e-6)
    _, first = mdir.restore_params(run_1dev, step=3)
    assert _max_diff(first, params) > 1e-4


def test_tensorboard_scalars_read_back_by_tensorflow_too(run_1dev):
    """The event file lima-train writes holds scalar summaries (TensorBoard's scalars plugin) that
    TensorFlow's own event reader reads to the same values as TensorBoard's."""
    import glob

    import tensorflow as tf
    from tensorboard.util.tensor_util import make_ndarray

    [events] = glob.glob(os.path.join(run_1dev, mdir.TENSORBOARD, "events.out.tfevents.*"))
    values, plugins = {}, {}
    for event in tf.compat.v1.train.summary_iterator(events):
        for v in event.summary.value:
            values.setdefault(v.tag, {})[event.step] = float(make_ndarray(v.tensor))
            plugins.setdefault(v.tag, set()).add(v.metadata.plugin_data.plugin_name)
    assert {"loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(values)
    assert all("scalars" in names for names in plugins.values()), plugins
    assert values["loss"] == _scalars(run_1dev, "loss")


def test_kill_9_after_first_checkpoint_then_resume_is_bit_identical(run_1dev, tmp_path):
    model_dir = str(tmp_path / "run")
    # Epochs after the first are slowed (test input only) so the kill lands before the run ends.
    proc = subprocess.Popen(_cmd(model_dir), env=_env(1, LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1="1.0"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not mdir.list_checkpoint_steps(model_dir):
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert mdir.list_checkpoint_steps(model_dir)[-1] < TOTAL_STEPS
    _run(_cmd(model_dir), _env(1))  # the same command again
    assert mdir.list_checkpoint_steps(model_dir)[-1] == TOTAL_STEPS
    _, resumed = mdir.restore_params(model_dir)
    _, reference = mdir.restore_params(run_1dev)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(model_dir), env=_env(1, LIMA_FAKE_INPUT_DELAY_AFTER_EPOCH1="0.5"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not mdir.list_checkpoint_steps(model_dir):
        assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
        time.sleep(0.05)
    time.sleep(0.8)  # inside epoch 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved step" in out
    steps = mdir.list_checkpoint_steps(model_dir)
    assert steps[-1] not in (3, TOTAL_STEPS), steps  # a mid-epoch checkpoint
    assert not mdir.checkpoint_meta(model_dir, steps[-1])["end_of_epoch"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    # A learning rate of 1e30 blows the weights up after the first step.
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+"):
        train_cli.main([f"--gin_file={FAKE_GIN}", f"--model_dir={model_dir}", "--gin_bindings=recipe.learning_rate=1e30",
                        "--gin_bindings=recipe.final_learning_rate=1e30",
                        "--gin_bindings=model_config.remat_policy='none'"])
    for step in mdir.list_checkpoint_steps(model_dir):
        _, params = mdir.restore_params(model_dir, step)
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))


# ---- meshes and hosts ---------------------------------------------------------------------------
def test_8_devices_fsdp_tensor_match_1_device(run_1dev, run_8dev):
    config, p1 = mdir.restore_params(run_1dev)
    _, p8 = mdir.restore_params(run_8dev)
    np.testing.assert_allclose(_logits(config, p8, TOKENS), _logits(config, p1, TOKENS), atol=1e-4, rtol=0)
    # Adam is blind to a gradient's scale, so compare the gradient norms too.
    g1, g8 = _scalars(run_1dev, "grad_norm"), _scalars(run_8dev, "grad_norm")
    np.testing.assert_allclose([g8[s] for s in sorted(g1)], [g1[s] for s in sorted(g1)], rtol=1e-4)
    # Both runs pack (train_fake.gin): one device in rows of 2 (the microbatches), 8 devices in rows of
    # 8 (data × fsdp × microbatches), so the same packed layout with more empty rows appended.
    r1, r8 = _scalars(run_1dev, "rows"), _scalars(run_8dev, "rows")
    assert min(r1.values()) < 8 and set(r8.values()) == {8}, (r1, r8)


def test_two_processes_reproduce_one_process(run_8dev, tmp_path):
    model_dir = str(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cmd(model_dir, f"--gin_file={CPU8_GIN}", f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}"),
                              env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert mdir.list_checkpoint_steps(model_dir) == [3, 6, 9]
    _, p2 = mdir.restore_params(model_dir)
    _, p8 = mdir.restore_params(run_8dev)
    assert _max_diff(p2, p8) < 1e-5


SHARDING_CHECK = r"""
import os, sys
import jax, numpy as np
from lima_jax import gin_config, mesh as mesh_lib, recipe, train, train_step
gin_config.parse([sys.argv[1], sys.argv[2]], [])
mesh = mesh_lib.make_mesh()
rules, fsdp = mesh_lib.logical_rules()
config = recipe.model_config()
r = recipe.recipe()
ts = train_step.build_train_step(config, r, mesh, rules, fsdp, 9)
state = train_step.init_state(config, ts, 0, None)
q = state.params["layers"]["attn"]["q_proj"]
mu = state.opt_state[0].mu["layers"]["mlp"]["up_proj"]
print("Q", tuple(q.sharding.spec), len(q.addressable_shards), q.addressable_shards[0].data.shape, q.shape)
print("MU", tuple(mu.sharding.spec), mu.addressable_shards[0].data.shape, mu.shape)
print("EMBED", tuple(state.params["embed"].sharding.spec))
"""


def test_large_params_and_optimizer_state_are_sharded_on_the_mesh():
    proc = _run([sys.executable, "-c", SHARDING_CHECK, FAKE_GIN, CPU8_GIN], _env(8))
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0] in ("Q", "MU", "EMBED"))
    # q_proj [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor -> a quarter per device.
    assert lines["Q"] == "(None, 'fsdp', 'tensor', None) 8 (2, 32, 2, 16) (2, 64, 4, 16)", lines
    assert lines["MU"].startswith("(None, 'fsdp', 'tensor') (2, 32, 88)"), lines
    assert lines["EMBED"] == "('tensor', 'fsdp')", lines


def test_make_mesh_sizes():
    devices = jax.devices() * 8  # only shapes are checked
    assert dict(mesh_lib.make_mesh(2, -1, 2, devices=devices).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        mesh_lib.make_mesh(2, 4, 2, devices=devices)


# ---- the demo (real data pipeline) --------------------------------------------------------------
def test_demo_gin_trains_on_the_demo_data(tmp_path):
    from data_pipeline import demo_data, lima_dataset

    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
    demo_data.write_demo_data(manual)
    lima_dataset.build(manual, data_dir)
    tokenizer = demo_data.train_demo_tokenizer(str(tmp_path / "tokenizer"))
    model_dir = str(tmp_path / "run")
    assert train_cli.main([f"--gin_file={os.path.join(ROOT, 'gin', 'runs', 'demo.gin')}", f"--model_dir={model_dir}",
                           f"--gin_bindings=DATA_DIR='{data_dir}'", f"--gin_bindings=TOKENIZER='{tokenizer}'"]) == 0
    assert sorted(mdir.epoch_steps(model_dir)) == [1, 2, 3]
    assert os.path.exists(os.path.join(model_dir, mdir.OPERATIVE_CONFIG))
    loss = _scalars(model_dir, "loss")
    steps = sorted(loss)
    assert loss[steps[-1]] < loss[steps[0]]


# ---- packing ------------------------------------------------------------------------------------
def _step_on(packing, steps=3):
    """(metrics of the first step, grads of the first step, params after `steps`) of the tiny float32
    model without dropout on the fake examples, padded or packed."""
    from tests.train_fakes import ArrayInput

    gin.clear_config()  # no binding of an earlier test (e.g. LIMA's dropout) reaches model_config
    config = recipe_lib.model_config(preset="tiny", dtype="float32", param_dtype="float32", platform="cpu",
                                     residual_dropout=0.0, remat_policy="none", scan_layers=False)
    r = optimizer.Recipe(steps, 8, 32, 1e-3, 1e-3, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules, _ = mesh_lib.logical_rules()
    data = ArrayInput("fake", None, None, 8, 32, 0, packing=packing)
    first = next(data)
    ts = train_step.build_train_step(config, r, mesh, rules, (), total_steps=steps, rows=len(first["decoder_input_tokens"]))
    state = train_step.init_state(config, ts, 0, None)

    def grads_of(batch):
        from flax import nnx

        from lima_jax.model import Llama
        graphdef = nnx.split(nnx.eval_shape(lambda: Llama(config)))[0]

        def loss(params):
            logits = nnx.merge(graphdef, params)(batch["decoder_input_tokens"], segment_ids=batch["decoder_segment_ids"],
                                                  positions=batch["decoder_positions"]).logits
            total, _, weight = train_step.token_loss(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
            return total / weight
        return jax.grad(loss)(state.params)

    grads = grads_of({k: jnp_array(v) for k, v in first.items()})
    batch = first
    metrics0 = None
    for i in range(steps):  # the jitted step traces once per row count
        state, metrics = ts.fn(state, {k: jnp_array(v) for k, v in batch.items()})
        metrics0 = metrics0 or jax.device_get(metrics)
        batch = next(data)
    return metrics0, grads, state.params, len(first["decoder_input_tokens"])


def jnp_array(x):
    import jax.numpy as jnp
    return jnp.asarray(x)


def test_packed_step_equals_padded_step_without_dropout():
    m_pad, g_pad, p_pad, rows_pad = _step_on(packing=False)
    m_pack, g_pack, p_pack, rows_pack = _step_on(packing=True)
    assert rows_pack < rows_pad == 8  # the fake examples really share rows
    assert float(m_pack["loss"]) == pytest.approx(float(m_pad["loss"]), rel=1e-5)
    assert m_pack["loss_tokens"] == m_pad["loss_tokens"] and m_pack["examples"] == m_pad["examples"] == 8
    for a, b in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    config = recipe_lib.model_config(preset="tiny", dtype="float32", param_dtype="float32", platform="cpu",
                                     residual_dropout=0.0)
    np.testing.assert_allclose(_logits(config, p_pack, TOKENS), _logits(config, p_pad, TOKENS), atol=1e-4, rtol=0)


def test_segments_are_isolated_bit_for_bit():
    """Changing one example's tokens leaves the logits of the other examples in its row unchanged."""
    import jax.numpy as jnp

    from lima_jax.language_model import build_model

    config = recipe_lib.model_config(preset="tiny", dtype="float32", param_dtype="float32", platform="cpu",
                                     residual_dropout=0.0)
    model = build_model(config, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 400, (1, 48)).astype(np.int32)
    segments = np.array([[1] * 20 + [2] * 12 + [3] * 16], np.int32)
    positions = np.array([list(range(20)) + list(range(12)) + list(range(16))], np.int32)
    run = jax.jit(lambda t: model(t, segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions)).logits)
    before = np.asarray(run(jnp.asarray(tokens)))
    changed = tokens.copy()
    changed[0, 20:32] = rng.integers(3, 400, 12)
    after = np.asarray(run(jnp.asarray(changed)))
    others = segments[0] != 2
    assert np.array_equal(before[0, others], after[0, others])
    assert not np.array_equal(before[0, ~others], after[0, ~others])
