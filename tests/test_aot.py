"""lima_jax/aot.py: the slice table, the golden parameter sharding, and the TPU compile of the real step."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lima_jax import aot, train_step

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "llama_65b_v4_256_specs.json")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the 'tpu' extra) is not installed: no TPU compiler")


def test_slice_table_devices_and_memory():
    v4 = aot.get_slice("v4-256")
    assert (v4.topology, v4.chips, v4.devices) == ("v4:4x4x8", 128, 256)
    assert v4.hbm_per_device == 16 * 2 ** 30
    v5p = aot.get_slice("v5p-8")
    assert (v5p.topology, v5p.chips, v5p.devices, v5p.hbm_per_device) == ("v5:2x2x1", 4, 4, 95 * 2 ** 30)
    assert aot.get_slice("v5e-16").topology == "v5e:4x4"
    with pytest.raises(ValueError, match="unknown TPU slice 'v9-8'"):
        aot.get_slice("v9-8")


def test_default_mesh_splits_the_batch_evenly():
    assert aot.default_mesh(256, 32) == {"data": 1, "fsdp": 32, "tensor": 8}
    assert aot.default_mesh(8, 32) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert aot.parse_mesh("fsdp=64,tensor=4", 256, 32) == {"data": 1, "fsdp": 64, "tensor": 4}
    with pytest.raises(ValueError, match="--mesh"):
        aot.parse_mesh("pipeline=2", 8, 32)


def test_llama_65b_sharding_matches_golden():
    """A change to the logical rules or the parameter names shows up here, in review."""
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert aot.golden_specs() == golden
    # and the golden says what we mean: FSDP on embed, tensor parallel on heads / mlp / vocab
    specs = golden["specs"]
    assert specs["layers/attn/q_proj"] == [None, "fsdp", "tensor", None]
    assert specs["layers/mlp/down_proj"] == [None, "tensor", "fsdp"]


def _tiny_compile(monkeypatch, **kwargs):
    """Compiles the tiny model's train step for a v4-8, recording what aot lowered."""
    calls = []
    real_build = train_step.build_train_step

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            calls.append(args)
            return self.fn.lower(*args)

    def spy_build(*args, **kw):
        ts = real_build(*args, **kw)
        calls.append(ts)
        return ts._replace(fn=Spy(ts.fn))

    monkeypatch.setattr(train_step, "build_train_step", spy_build)
    kwargs = {"batch_size": 8, "seq_len": 64, **kwargs}
    report = aot.compile_step("tiny", "v4-8", **kwargs)
    return report, calls


@needs_libtpu
def test_compiles_the_very_train_step_lima_train_uses(monkeypatch):
    report, calls = _tiny_compile(monkeypatch, extra_gin=["PACKING=False"])
    ts, lowered_with = calls[:2]  # then the prediction's unrolled compiles
    # the function lowered is train_step.build_train_step's own jitted step, on its own abstract inputs
    assert isinstance(ts, train_step.TrainStep)
    assert lowered_with == (ts.abstract_state, ts.abstract_batch)
    assert report["fits"] is True and report["n_devices"] == 8
    assert report["packing"] is False and report["rows"] == 8


@needs_libtpu
def test_cli_writes_every_field(tmp_path):
    from lima_jax.cli import aot as cli

    out = tmp_path / "r.json"
    assert cli.main(["--model", "tiny", "--topology", "v4-8", "--batch_size", "8", "--seq_len", "64",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for field in ("model", "topology", "mesh", "n_devices", "per_device_bytes", "hbm_bytes", "fits",
                  "flops_per_step", "model_flops_per_step", "compile_s"):
        assert field in report, field
    assert report["per_device_bytes"] == (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                                          - report["alias_bytes"])
    assert report["flops_per_step"] > 0 and report["model_flops_per_step"] > 0


def test_cli_bad_slice_is_one_line(capsys):
    from lima_jax.cli import aot as cli

    assert cli.main(["--topology", "v9-8"]) == 2
    assert capsys.readouterr().err.strip().startswith("lima-aot: error: unknown TPU slice 'v9-8'")


# The acceptance figures: minutes of compiling each, so run on demand: pytest -m slow tests/test_aot.py
@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("model,slice_name,fits", [("llama_65b", "v4-256", True), ("llama_65b", "v4-8", False),
                                                   ("llama_7b", "v5p-8", True)])
def test_lima_sft_fit(model, slice_name, fits):
    report = aot.compile_step(model, slice_name, batch_size=32, seq_len=2048, rows=32, remat="full", predict=False)
    assert report["fits"] is fits, report
    if not fits:
        assert report["reason"]
    else:
        assert report["attention_kernel"] == "splash" and report["mosaic_kernels"] >= 3


# The TPU-speed targets, with the plan's remat and mesh (about 10 minutes for 65B, an hour for 7B): pytest -m slow -k mfu
@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("model,slice_name,target", [("llama_7b", "v5p-8", 0.65), ("llama_65b", "v4-256", 0.60)])
def test_planned_mfu_reaches_the_target(model, slice_name, target):
    from lima_jax import plan

    result = plan.plan(model, slice_name, 32, 2048, rows=32)
    assert result["best"] is not None, plan.candidates_table(result)
    assert result["best"]["predicted_mfu"] >= target, plan.candidates_table(result)


@needs_libtpu
def test_decode_step_compiles_the_generate_loop_body(monkeypatch):
    from lima_jax import decoding

    traced = []
    real = decoding.decode_step
    monkeypatch.setattr(decoding, "decode_step", lambda *a, **k: traced.append(a) or real(*a, **k))
    report = aot.compile_step("tiny", "v4-8", batch_size=8, seq_len=128, step="decode")
    assert traced, "lima-aot --step decode must lower decoding.decode_step, the loop body of lm.generate"
    assert report["fits"] is True and report["per_device_bytes"] > 0 and report["step"] == "decode"
    assert report["prefill_prompt_len"] == 64 and report["prefill_bytes_per_device"] > 0  # prompt_bucket(128 // 2)
    assert report["predicted_step_s"] > 0 and report["predicted_bytes_per_device"] > 0


def test_packed_rows_from_lima_lengths_or_from_the_data():
    """Without data: LIMA's mean example (674 tokens) × 32 fills 10.5 rows of 2048, rounded up to the
    batch's devices (never above the padded rows). With lima-train's input: its most used bucket."""
    from collections import Counter

    from tests.train_fakes import fake_examples
    from data_pipeline.inputs import StepInput

    assert aot.packed_rows(32, 2048, 1)[0] == 11
    assert aot.packed_rows(32, 2048, 8)[0] == 16
    assert aot.packed_rows(32, 2048, 32)[0] == 32
    assert aot.packed_rows(32, 512, 8)[0] == 32
    data = StepInput(*fake_examples(64), 12, 64, seed=0, packing=True, row_multiple=2)
    used = Counter(data.rows(e, s) for e in range(3) for s in range(data.steps_per_epoch))
    rows, how = aot.packed_rows(12, 64, 2, data, epochs=3)
    assert rows == used.most_common(1)[0][0] < 12 and "bucket" in how


@needs_libtpu
def test_compiles_the_packed_step_lima_train_runs_most(monkeypatch):
    from tests.train_fakes import fake_examples
    from data_pipeline.inputs import StepInput

    made = []

    def input_for(row_multiple, seed):
        made.append(row_multiple)
        return StepInput(*fake_examples(64), 24, 64, seed, packing=True, row_multiple=row_multiple)

    report, calls = _tiny_compile(monkeypatch, mesh_text="fsdp=2,tensor=4", input_for=input_for, batch_size=24)
    expected, _ = aot.packed_rows(24, 64, 2, input_for(2, 0), epochs=15)
    _, (_, batch) = calls[:2]
    assert made[0] == 2 and report["packing"] is True
    assert report["rows"] == expected < 24 and batch["decoder_input_tokens"].shape == (expected, 64)
    assert report["model_flops_per_step"] == train_step.model_flops_per_step(
        aot._configure("tiny", 24, 64, None, [])[1], expected, 64)
    with pytest.raises(ValueError, match="multiple of 2"):
        aot.compile_step("tiny", "v4-8", "fsdp=2,tensor=4", batch_size=8, seq_len=64, rows=3)


# ---- the TPU compiler's predicted speed -------------------------------------------------------------
@needs_libtpu
@pytest.mark.parametrize("slice_name,cost_model_peak", [("v4-8", 137e12), ("v5p-8", 394e12)])
def test_predicted_time_of_one_matmul_is_its_flops_over_the_cost_models_peak(slice_name, cost_model_peak):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = aot.topology_devices(aot.get_slice(slice_name))[0]
    a = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(Mesh([device], ("x",)), PartitionSpec()))
    compiled = jax.jit(jnp.matmul).lower(a, a).compile()
    assert aot.optimal_seconds(compiled) == pytest.approx(2 * 8192 ** 3 / cost_model_peak, rel=0.05)


def _splash_program(slice_name, layers, heads=4, length=1024, head_dim=128, rows=2):
    """The lowered gradient of `layers` splash attentions in a row on one device of the slice."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lima_jax import sharding as sharding_lib, splash_attention

    device = aot.topology_devices(aot.get_slice(slice_name))[0]
    mesh = Mesh([device], ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((rows, length, heads, head_dim), jnp.bfloat16, sharding=sharding)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)

    def loss(q, k, v, ids):
        for _ in range(layers):
            q = splash_attention.splash_causal_attention(q, k, v, ids)
        return q.astype(jnp.float32).sum()

    with sharding_lib.use_rules(mesh, ()):  # the TPU mesh: the real kernel, not the interpreter
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids), device


@needs_libtpu
def test_mosaic_kernel_flops_are_counted_per_call():
    """The cost model does not see the products inside the splash kernels: lima-aot counts them
    from the lowered module, once per call even where JAX lowered the kernel's function once."""
    lowered, device = _splash_program("v5p-8", layers=3)
    rows, heads, t, d = 2, 4, 1024, 128
    blocks = 2  # 1024 keys in blocks of 512: 3 of the 4 block pairs are on or below the diagonal
    one_layer = 2 * rows * heads * t * t * d * (blocks + 1) / (2 * blocks) * (2 + 3 + 4)  # fwd, dq, dkv
    text = lowered.as_text()
    assert text.count("tpu_custom_call") < 9  # JAX shares the kernels' lowered functions between calls
    assert len(aot.mosaic_calls(text)) == 9
    assert aot.kernel_flops(text) == pytest.approx(3 * one_layer)
    # the compiler's own count misses them: its flops are a fraction of the kernels'
    assert aot.program_cost(lowered.compile())["flops"] < 0.05 * aot.kernel_flops(text)
    assert aot.cost_model_peak(device) == pytest.approx(394e12, rel=0.05)


@needs_libtpu
def test_v4_prediction_compiles_without_cmem():
    """libtpu 0.0.52's v4 cost model costs each op that touches CMEM at -1 s: splash attention's
    gradient at 2048 tokens comes out negative with CMEM, positive without it, and so does a v4 step."""
    lowered, _ = _splash_program("v4-8", layers=1, heads=32, length=2048, rows=1)
    assert aot.optimal_seconds(lowered.compile()) < 0
    assert aot.optimal_seconds(lowered.compile(compiler_options=aot.PREDICT_COMPILER_OPTIONS["v4"])) > 0
    report = aot.compile_step("tiny", "v4-8", batch_size=16, seq_len=2048, rows=16)
    assert report["fits"] and report["predicted_step_s"] > 0 and report["predicted_mfu"] > 0


@needs_libtpu
def test_prediction_compiles_without_collective_matmuls():
    """A tensor-parallel matmul whose partial sums are reduce-scattered onto the sequence (sequence
    parallelism's pattern) becomes, by default, a loop of collective-permutes and partial matmuls (a
    "windowed einsum"), and the cost analysis counts a loop's body once: a quarter of the flops here.
    The prediction's compile keeps the plain collective, priced whole."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = aot.topology_devices(aot.get_slice("v4-16"))
    mesh = Mesh(devices, ("tensor",))
    t, e, f = 2048, 8192, 8192
    x = jax.ShapeDtypeStruct((1, t, f), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
    w = jax.ShapeDtypeStruct((f, e), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("tensor", None)))
    scattered = NamedSharding(mesh, PartitionSpec(None, "tensor", None))
    lowered = jax.jit(lambda x, w: jax.lax.with_sharding_constraint(jnp.einsum("btf,fe->bte", x, w), scattered)
                      ).lower(x, w)
    flops = 2 * t * e * f / len(devices)
    default = lowered.compile()
    assert " while(" in default.as_text() and aot.program_cost(default)["flops"] < 0.5 * flops
    predicted = lowered.compile(compiler_options=aot.PREDICT_COMPILER_OPTIONS["v4"])
    assert " while(" not in predicted.as_text()
    assert aot.program_cost(predicted)["flops"] == pytest.approx(flops, rel=0.01)


@needs_libtpu
@pytest.mark.parametrize("act_length", ["tensor", None])
def test_residual_stream_splits_the_sequence_over_the_tensor_axis(act_length):
    """Sequence parallelism (the default rules: act_length → tensor): between sublayers each tensor
    device holds a slice of each row, so norms and dropout are not repeated on every tensor device;
    with ('act_length', None) the rows stay whole there."""
    import jax
    from flax import nnx

    from lima_jax import mesh as mesh_lib, sharding
    from lima_jax.model import Llama

    _, config, _ = aot._configure("tiny", 2, 256, "full", [])
    config = config.replace(scan_layers=False)
    mesh = mesh_lib.make_mesh(devices=aot.topology_devices(aot.get_slice("v4-8")), data=1, fsdp=2, tensor=4)
    rules = tuple((name, act_length if name == "act_length" else target) for name, target in sharding.DEFAULT_RULES)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config)))
    tokens = jax.ShapeDtypeStruct((2, 256), "int32", sharding=train_step.batch_sharding(mesh, rules))

    def hidden_states(params, tokens):
        with sharding.use_rules(mesh, rules, ("fsdp",)):
            return nnx.merge(graphdef, params)(tokens, return_hidden_states=True).hidden_states

    compiled = jax.jit(hidden_states).lower(params, tokens).compile()
    spec = tuple(compiled.output_shardings.spec) + (None,) * 4  # [layers + 1, rows, length, embed]
    assert spec[1:4] == ("fsdp", act_length, None), spec


def test_extend_linearly():
    assert aot.extend_linearly({2: 1.0, 3: 1.5}, 32) == pytest.approx(16.0)
    assert aot.extend_linearly({2: 1.0}, 2) == 1.0


@needs_libtpu
def test_prediction_extended_from_two_depths_equals_the_unrolled_whole():
    """A 4-layer tiny model: its step predicted from unrolled compiles at 2 and 3 layers equals the
    unrolled 4-layer compile's optimal_seconds within 2%."""
    from lima_jax import mesh as mesh_lib

    r, config, _ = aot._configure("tiny", 8, 256, None, [])
    devices = aot.topology_devices(aot.get_slice("v4-8"))
    mesh = mesh_lib.make_mesh(devices=devices, data=1, fsdp=8, tensor=1)
    rules, fsdp_axes = mesh_lib.logical_rules()

    def lower_at(depth):
        ts = train_step.build_train_step(config.replace(num_layers=depth, scan_layers=False), r, mesh, rules,
                                         fsdp_axes, total_steps=1, rows=8)
        return ts.fn.lower(ts.abstract_state, ts.abstract_batch)

    peak = aot.cost_model_peak(devices[0])
    predicted = aot.predict_by_depth(lower_at, 4, peak)
    assert predicted["prediction_method"].startswith("unrolled at 2 and 3 layers, extended linearly to 4")
    lowered = lower_at(4)
    whole = aot.optimal_seconds(lowered.compile()) + aot.kernel_flops(lowered.as_text()) / peak
    assert predicted["predicted_step_s"] == pytest.approx(whole, rel=0.02)
    assert set(predicted["predicted_s_at_depths"]) == {"2", "3"}


@needs_libtpu
def test_report_predicts_mfu_and_tokens_per_chip(monkeypatch):
    report, _ = _tiny_compile(monkeypatch)
    chips, peak = 4, aot.CHIP_PEAK_FLOPS["v4"]
    assert report["predicted_step_s"] > 0 and report["attention_kernel"] and report["remat"]
    assert report["predicted_mfu"] == pytest.approx(report["model_flops_per_step"] / (report["predicted_step_s"] * chips * peak))
    assert report["predicted_tokens_per_s_per_chip"] == pytest.approx(8 * 64 / report["predicted_step_s"] / chips)
    assert "MFU" in aot.describe(report)
    # TPU's default attention is the splash kernel: Mosaic calls for its forward, dq and dkv, whose
    # products the prediction adds to the cost model's time at the cost model's matmul rate
    assert report["attention_kernel"] == "splash" and report["mosaic_kernels"] >= 3
    assert report["kernel_flops_per_device"] > 0
    assert report["predicted_step_s"] == pytest.approx(
        report["cost_model_step_s"] + report["kernel_flops_per_device"] / aot.CHIP_PEAK_FLOPS["v4"] * 2, rel=0.05)


@needs_libtpu
def test_prediction_counts_every_microbatch():
    """Split into 2 microbatches the step does the same work (plus a second gather of the weights):
    its prediction must not halve, as it would if the accumulation loop's body counted once."""
    one = aot.compile_step("tiny", "v4-8", batch_size=16, seq_len=256, rows=16, extra_gin=["recipe.grad_accum_steps=1"])
    two = aot.compile_step("tiny", "v4-8", batch_size=16, seq_len=256, rows=16, extra_gin=["recipe.grad_accum_steps=2"])
    assert two["predicted_step_s"] >= 0.9 * one["predicted_step_s"], (one["predicted_step_s"], two["predicted_step_s"])


def test_a_non_positive_cost_model_time_is_no_prediction():
    """libtpu 0.0.52's v4 cost model returns negative totals for some large steps: report none."""
    class Fake:
        def __init__(self, seconds):
            self.seconds = seconds

        def compile(self, compiler_options=None):
            return self

        def as_text(self):
            return ""

        def cost_analysis(self):
            return {"optimal_seconds": self.seconds, "bytes accessed": 1.0}

    times = {2: -35.9, 3: -56.9}
    result = aot.predict_by_depth(lambda d: Fake(times[d]), 80, 1e12)
    assert result["predicted_step_s"] is None and "non-positive" in result["prediction_note"]
    good = aot.predict_by_depth(lambda d: Fake({2: 1.0, 3: 1.5}[d]), 80, 1e12)
    assert good["predicted_step_s"] == pytest.approx(40.0) and "prediction_note" not in good


@needs_libtpu
def test_offload_remat_puts_the_saved_activations_in_host_memory():
    from lima_jax import mesh as mesh_lib

    def lowered_text(remat):
        r, config, _ = aot._configure("tiny", 8, 256, remat, [])
        mesh = mesh_lib.make_mesh(devices=aot.topology_devices(aot.get_slice("v5p-8")), data=1, fsdp=4, tensor=1)
        rules, fsdp_axes = mesh_lib.logical_rules()
        ts = train_step.build_train_step(config, r, mesh, rules, fsdp_axes, rows=8)
        return ts.fn.lower(ts.abstract_state, ts.abstract_batch).as_text()

    assert "pinned_host" in lowered_text("offload_qkv_attn")
    assert "pinned_host" not in lowered_text("qkv_attn")
