"""lima-convert (lima_jax/convert.py, lima_jax/cli/convert.py): HF → Orbax → HF round trips, EOT,
vocabulary padding, tokenizer export, verify, and bad inputs."""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import LLAMA_TOKENIZER, hf_logits, make_hf_model, needs_llama_tokenizer
from lima_jax import convert, hf_io
from lima_jax.checkpoint import load_pretrained, restore_converted
from lima_jax.cli.convert import main
from lima_jax.safetensors_io import SafetensorsFile, iter_checkpoint_files

TOKENS = np.array([[1, 5, 9, 200, 17, 3, 250, 8], [2, 44, 0, 7, 7, 130, 64, 99]])


def save_hf(tmp_path, name, dtype="float32", max_shard_size=None, seed=0, **overrides):
    import torch

    model = make_hf_model(seed, **overrides)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    folder = str(tmp_path / name)
    model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    return model, folder


def read_all(folder) -> dict:
    tensors = {}
    for path in iter_checkpoint_files(folder):
        f = SafetensorsFile(path)
        for name in f.names():
            assert name not in tensors, f"{name} stored twice"
            tensors[name] = f.read(name)
    return tensors


def assert_no_output(out):
    parent, base = os.path.split(str(out))
    assert not os.path.exists(out), f"{out} was created"
    assert [n for n in os.listdir(parent) if n.startswith(base + ".")] == [], "temporary output left behind"


def run_cli(argv, capsys=None):
    """main(argv) → (exit code, its stderr)."""
    if capsys is not None:
        capsys.readouterr()  # drop what earlier steps (e.g. save_pretrained's progress bar) printed
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# ---- acceptance: bit-exact round trip, and the export loads in transformers with equal logits -------
@pytest.mark.parametrize("variant, dtype", [
    ("untied_gqa_sharded", "float32"), ("untied_gqa_sharded", "bfloat16"), ("tied", "float32"), ("tied", "bfloat16"),
])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, variant, dtype):
    import torch
    from transformers import LlamaForCausalLM

    if variant == "tied":
        model, src = save_hf(tmp_path, "src", dtype, tie_word_embeddings=True)
    else:
        model, src = save_hf(tmp_path, "src", dtype, max_shard_size="20KB", num_key_value_heads=2)
        assert len(list(iter_checkpoint_files(src))) >= 3
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["hf-to-orbax", src, ckpt]) == 0
    assert main(["orbax-to-hf", ckpt, out, "--max_shard_size", "40KB"]) == 0

    before, after = read_all(src), read_all(out)
    assert sorted(before) == sorted(after)
    for name, a in before.items():
        b = after[name]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), name
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    assert {a.dtype for a in after.values()} == {want}
    if variant == "tied":
        assert "lm_head.weight" not in after
    with open(os.path.join(out, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["tie_word_embeddings"] == (variant == "tied") and hf_config["dtype"] == dtype

    # The reference is the source folder loaded the same way (an in-memory model cast with .to(bf16)
    # also casts its rotary buffer, which a loaded model recomputes in float32).
    source = LlamaForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
    exported = LlamaForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    if variant == "tied":
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(hf_logits(exported, TOKENS), hf_logits(source, TOKENS))
    if dtype == "float32":
        np.testing.assert_array_equal(hf_logits(exported, TOKENS), hf_logits(model, TOKENS))


def test_converted_checkpoint_loads_with_load_pretrained(tmp_path):
    model, src = save_hf(tmp_path, "src", num_key_value_heads=2)
    ckpt = str(tmp_path / "ckpt")
    config = convert.hf_to_orbax(src, ckpt)
    assert sorted(os.listdir(ckpt)) == ["lima_config.json", "params"]
    saved, params = restore_converted(ckpt)
    assert saved == config
    assert set(hf_io.flatten(params)) == set(hf_io.our_shapes(config))
    lm = load_pretrained(ckpt)
    np.testing.assert_allclose(lm.logits(TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_dtype_cast_both_ways(tmp_path):
    _, src = save_hf(tmp_path, "src")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["hf-to-orbax", src, ckpt, "--dtype", "bfloat16"]) == 0
    config, params = restore_converted(ckpt)
    assert config.param_dtype == "bfloat16"
    assert {a.dtype for a in hf_io.flatten(params).values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert main(["orbax-to-hf", ckpt, out, "--dtype", "float32"]) == 0
    before, after = read_all(src), read_all(out)
    for name, a in before.items():
        assert after[name].dtype == np.float32
        np.testing.assert_array_equal(after[name], a.astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- EOT and vocabulary padding ----------------------------------------------------------------------
def test_add_eot_with_padding_on_a_tied_model(tmp_path, capsys):
    model, src = save_hf(tmp_path, "src", tie_word_embeddings=True)  # vocab 256, no tokenizer.model
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["hf-to-orbax", src, ckpt, "--add_eot", "--vocab_padding_multiple", "128"]) == 0
    config, params = restore_converted(ckpt)
    assert (config.vocab_size, config.eot_token_id, config.padded_vocab_size) == (257, 256, 384)
    embed = params["embed"]
    source = model.model.embed_tokens.weight.detach().numpy()
    assert embed.shape == (384, 64) and "lm_head" not in params
    np.testing.assert_array_equal(embed[:256], source)
    np.testing.assert_allclose(embed[256], source.mean(axis=0, dtype=np.float64), rtol=1e-4, atol=1e-8)
    assert not embed[257:].any()

    lm = load_pretrained(ckpt)  # padded rows are never predicted; the shared vocabulary matches HF
    logits = lm.logits(TOKENS)
    assert logits.shape[-1] == 257
    np.testing.assert_allclose(logits[..., :256], hf_logits(model, TOKENS), atol=1e-4, rtol=0)
    code, _ = run_cli(["verify", src, ckpt, "--tol", "1e-4"], capsys)
    assert code == 0

    assert main(["orbax-to-hf", ckpt, out]) == 0
    tensors = read_all(out)
    assert tensors["model.embed_tokens.weight"].shape == (257, 64) and "lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], embed[:257])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 257
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 256]


def test_vocab_padding_alone_round_trips(tmp_path):
    _, src = save_hf(tmp_path, "src", vocab_size=250)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["hf-to-orbax", src, ckpt, "--vocab_padding_multiple", "64"]) == 0
    config, params = restore_converted(ckpt)
    assert params["embed"].shape == (256, 64) and params["lm_head"].shape == (64, 256)
    assert config.eot_token_id is None
    assert main(["orbax-to-hf", ckpt, out]) == 0
    before, after = read_all(src), read_all(out)
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[n], after[n]) and before[n].shape == after[n].shape for n in before)


@needs_llama_tokenizer
def test_add_eot_exports_a_tokenizer_that_matches_sentencepiece(tmp_path):
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, src = save_hf(tmp_path, "src", vocab_size=32000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    shutil.copyfile(LLAMA_TOKENIZER, os.path.join(src, "tokenizer.model"))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["hf-to-orbax", src, ckpt, "--add_eot"]) == 0
    assert os.path.exists(os.path.join(ckpt, "tokenizer.model"))
    config, params = restore_converted(ckpt)
    assert (config.eot_token_id, config.vocab_size) == (32000, 32001)
    assert main(["orbax-to-hf", ckpt, out]) == 0

    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)
    texts = ["Hello world!", "  two leading spaces,\ttab\nnew line\n\n", "Ünïcödé 日本語 🙂", "x**2 == 4; [INST] <<SYS>>",
             "What is LIMA? Less Is More for Alignment."]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
    assert tok("hi").input_ids == [1] + sp.encode("hi")
    assert tok.convert_tokens_to_ids("<eot>") == 32000 and "<eot>" in tok.all_special_tokens
    # As in every HF tokenizer, a special token's literal text is parsed as that token.
    assert tok("a<eot>", add_special_tokens=False).input_ids == sp.encode("a") + [32000]
    assert tok.decode([15043, 32000], skip_special_tokens=True) == sp.decode([15043])

    exported = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    embed = exported.model.embed_tokens.weight.detach().numpy()
    head = exported.lm_head.weight.detach().numpy()
    assert embed.shape == (32001, 32) and head.shape == (32001, 32)
    source_embed = model.model.embed_tokens.weight.detach().numpy()
    source_head = model.lm_head.weight.detach().numpy()
    # The new rows are the mean of the old ones (float32 sums in a different order: not bit-equal).
    np.testing.assert_allclose(embed[32000], source_embed.mean(axis=0, dtype=np.float64), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(head[32000], source_head.mean(axis=0, dtype=np.float64), rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(embed[:32000], source_embed)
    np.testing.assert_array_equal(head[:32000], source_head)
    tokens = np.array([sp.encode("Less is more for alignment")])
    np.testing.assert_array_equal(hf_logits(exported, tokens)[..., :32000], hf_logits(model, tokens))

    # LIMA's chat format through transformers' own chat template machinery
    from lima_jax import chat_format
    from lima_jax.tokenizer import Tokenizer

    ours = Tokenizer(LLAMA_TOKENIZER)
    turns = ["Hi!\n\nHow do I *bold* text in markdown?", " Wrap it: **bold**.\n\n```md\n**x**\n```",
             "Ünïcödé too? 日本語 🙂\n- a list\n  - nested"]
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt["input_ids"] == chat_format.encode_prompt(turns, ours)
    dialogue = tok.apply_chat_template(messages[:2], tokenize=True, return_dict=True)
    assert dialogue["input_ids"] == chat_format.encode_conversation(turns[:2], ours)[0]
    with pytest.raises(Exception, match="alternate user and assistant"):
        tok.apply_chat_template(messages[1:], tokenize=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == [2, 32000]
    assert (generation["temperature"], generation["top_p"], generation["repetition_penalty"]) == (0.7, 0.9, 1.2)

    # transformers' generate with the exported generation config stops at <eot>: its logit forced high
    # (the head's <eot> row along the prompt's last hidden state), greedy for determinism
    ids = torch.tensor([prompt["input_ids"]])
    with torch.no_grad():
        h = exported(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        exported.lm_head.weight[32000] = h * (1e3 / h.dot(h))
    exported.generation_config.do_sample = False
    new = exported.generate(ids, max_new_tokens=20)[0, ids.shape[1]:].tolist()
    assert new == [32000], new
    exported.generation_config.eos_token_id = 2  # without <eot> among the stops it would go on
    assert len(exported.generate(ids, max_new_tokens=20)[0, ids.shape[1]:]) == 20


def test_add_eot_twice_is_an_error(tmp_path):
    _, src = save_hf(tmp_path, "src")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    convert.hf_to_orbax(src, ckpt, add_eot=True)
    convert.orbax_to_hf(ckpt, out)
    with pytest.raises(ValueError, match="already has eot_token_id=256"):
        convert.hf_to_orbax(out, str(tmp_path / "again"), add_eot=True)
    assert_no_output(tmp_path / "again")


# ---- verify ---------------------------------------------------------------------------------------
def test_verify_passes_on_a_conversion_and_fails_on_other_weights(tmp_path, capsys):
    _, src = save_hf(tmp_path, "src")
    _, other = save_hf(tmp_path, "other", seed=1)
    ckpt = str(tmp_path / "ckpt")
    convert.hf_to_orbax(src, ckpt)
    code = main(["verify", src, ckpt])
    report = capsys.readouterr().out
    assert code == 0 and "max_abs_logit_diff=" in report and "kl=" in report
    diff = float(report.split("max_abs_logit_diff=")[1].split()[0])
    assert diff <= 1e-4
    code = main(["verify", other, ckpt])
    assert code == 1
    assert float(capsys.readouterr().out.split("max_abs_logit_diff=")[1].split()[0]) > 1e-2


# ---- training model_dir source ----------------------------------------------------------------------
def test_orbax_to_hf_from_a_training_model_dir(tmp_path, monkeypatch):
    """A model_dir is read through model_dir.restore_params (the layout's one reader); --step reaches it."""
    from lima_jax import model_dir as model_dir_lib

    _, src = save_hf(tmp_path, "src")
    ckpt = str(tmp_path / "ckpt")
    convert.hf_to_orbax(src, ckpt)
    model_dir = tmp_path / "run"
    (model_dir / "checkpoints" / "7").mkdir(parents=True)
    calls = []

    def restore_params(path, step=None):
        calls.append((path, step))
        return restore_converted(ckpt)

    monkeypatch.setattr(model_dir_lib, "restore_params", restore_params)
    out = str(tmp_path / "out")
    assert main(["orbax-to-hf", str(model_dir), out, "--step", "7"]) == 0
    assert calls == [(str(model_dir), 7)]
    before, after = read_all(src), read_all(out)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[n], after[n]) for n in before)


# ---- bad inputs: a one-line error naming the file or tensor, and no partial output ---------------------
def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _corrupt_header(folder):
    path = sorted(iter_checkpoint_files(folder))[1]
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")


def _wrong_shape(folder):
    _edit_config(folder, intermediate_size=96)


def _drop_tensor(folder):
    from lima_jax.safetensors_io import write_safetensors

    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = os.path.join(folder, index["weight_map"]["model.layers.1.mlp.down_proj.weight"])
    st = SafetensorsFile(shard)
    kept = {n: st.read(n) for n in st.names() if n != "model.layers.1.mlp.down_proj.weight"}
    write_safetensors(shard, kept)
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    with open(index_path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: os.remove(os.path.join(d, "config.json")), "config.json: no config.json"),
    (_corrupt_header, "corrupt safetensors header"),
    (_wrong_shape, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (128, 64), config implies (96, 64)"),
    (lambda d: _edit_config(d, model_type="mistral"), "model_type is 'mistral', only 'llama' is supported"),
    (lambda d: _edit_config(d, architectures=["LlamaForSequenceClassification"]),
     "architecture 'LlamaForSequenceClassification' is not supported"),
    (_drop_tensor, "tensor 'model.layers.1.mlp.down_proj.weight' is missing"),
])
def test_bad_hf_input_is_a_one_line_error_without_output(tmp_path, capsys, breakage, message):
    _, src = save_hf(tmp_path, "src", max_shard_size="20KB")
    breakage(src)
    out = tmp_path / "ckpt"
    code, err = run_cli(["hf-to-orbax", src, str(out)], capsys)
    assert code == 2
    assert err.startswith("lima-convert: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err and src in err  # names the file (or folder) and what is wrong
    assert_no_output(out)


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    _, src = save_hf(tmp_path, "src")
    for command, target in (("hf-to-orbax", src), ("orbax-to-hf", None)):
        out = tmp_path / f"out-{command}"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if target is None:
            target = str(tmp_path / "out-hf-to-orbax")
        code, err = run_cli([command, target, str(out)], capsys)
        assert code == 2 and "already exists (pass --overwrite" in err and str(out) in err
        assert os.listdir(out) == ["keep.txt"]
        assert [n for n in os.listdir(tmp_path) if n.startswith(out.name + ".")] == []
        assert main([command, target, str(out), "--overwrite"]) == 0
        assert "keep.txt" not in os.listdir(out)
        assert [n for n in os.listdir(tmp_path) if n.startswith(out.name + ".")] == []


def test_failure_while_writing_removes_the_temporary_output(tmp_path, monkeypatch):
    _, src = save_hf(tmp_path, "src")
    real = hf_io.read_hf_param

    def failing(index, config, path, dtype=None):
        if path == ("layers", "mlp", "up_proj"):
            raise OSError("disk full (simulated)")
        return real(index, config, path, dtype)

    monkeypatch.setattr(hf_io, "read_hf_param", failing)
    out = tmp_path / "ckpt"
    with pytest.raises(Exception, match="disk full"):
        convert.hf_to_orbax(src, str(out))
    assert_no_output(out)


def test_orbax_to_hf_rejects_a_checkpoint_that_does_not_match_its_config(tmp_path, capsys):
    _, src = save_hf(tmp_path, "src")
    ckpt = tmp_path / "ckpt"
    convert.hf_to_orbax(src, str(ckpt))
    config = json.loads((ckpt / "lima_config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "lima_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, err = run_cli(["orbax-to-hf", str(ckpt), str(out)], capsys)
    assert code == 2 and "layers/mlp/gate_proj has shape (2, 64, 128), lima_config.json implies (2, 64, 96)" in err
    assert_no_output(out)


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("20KB") == 20_000
    assert convert.parse_size("2GiB") == 2 * 2**30 and convert.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size 'lots'"):
        convert.parse_size("lots")
