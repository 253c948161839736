"""The HF name map (hf_io) and the streaming safetensors reader/writer (safetensors_io)."""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from lima_jax import hf_io
from lima_jax.safetensors_io import SafetensorsFile, write_safetensors


def _state_dict(model) -> dict:
    import torch

    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def test_every_hf_tensor_maps_to_ours_and_back(hf_model_dir):
    model, folder = hf_model_dir(num_key_value_heads=2)
    config = hf_io.read_hf_config(folder)
    params = hf_io.flatten(hf_io.read_hf_params(folder, config))
    assert set(params) == set(hf_io.our_shapes(config))
    for path, array in params.items():
        assert array.shape == hf_io.our_shapes(config)[path], path
    state = _state_dict(model)
    seen = set()
    for hf_name, entry, layer in hf_io.iter_entries(config):
        ours = params[entry.path] if layer is None else params[entry.path][layer]
        back = hf_io.hf_tensor(entry, config, ours)
        assert back.dtype == state[hf_name].dtype and np.array_equal(back, state[hf_name]), hf_name
        seen.add(hf_name)
    assert seen == set(state)  # the table covers the whole untied model
    # The transposes are the ones the model expects: q_proj [embed, heads, head_dim].
    q = params[("layers", "attn", "q_proj")][1]
    np.testing.assert_array_equal(q.reshape(64, -1).T, state["model.layers.1.self_attn.q_proj.weight"])


def test_vocab_padding_rows_are_zero_and_trimmed(hf_model_dir):
    model, folder = hf_model_dir(vocab_size=250)
    config = hf_io.read_hf_config(folder, vocab_padding_multiple=64)
    assert config.padded_vocab_size == 256
    params = hf_io.read_hf_params(folder, config)
    embed, head = params["embed"], params["lm_head"]
    assert embed.shape == (256, 64) and head.shape == (64, 256)
    assert not embed[250:].any() and not head[:, 250:].any()
    state = _state_dict(model)
    for name, path in (("model.embed_tokens.weight", ("embed",)), ("lm_head.weight", ("lm_head",))):
        back = hf_io.hf_tensor(hf_io.ENTRIES_BY_PATH[path], config, hf_io.flatten(params)[path])
        np.testing.assert_array_equal(back, state[name])


def test_torch_bin_read_with_weights_only(tmp_path, hf_model_dir):
    import torch

    model, folder = hf_model_dir(seed=1)
    model = model.to(torch.bfloat16)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    os.link(os.path.join(folder, "config.json"), bin_dir / "config.json")
    config = hf_io.read_hf_config(str(bin_dir))
    index = hf_io.TensorIndex(str(bin_dir))
    assert index.dtype("model.norm.weight") == np.dtype(ml_dtypes.bfloat16)
    params = hf_io.flatten(hf_io.read_hf_params(str(bin_dir), config))
    state = _state_dict(model)
    for hf_name, entry, layer in hf_io.iter_entries(config):
        ours = params[entry.path] if layer is None else params[entry.path][layer]
        assert np.array_equal(hf_io.hf_tensor(entry, config, ours).view(np.uint16),
                              state[hf_name].view(np.uint16)), hf_name


def _rewrite_single_file(folder, edit):
    """Loads the folder's tensors into one model.safetensors after `edit(tensors)`."""
    from lima_jax.safetensors_io import iter_checkpoint_files

    tensors = {}
    for path in list(iter_checkpoint_files(folder)):
        f = SafetensorsFile(path)
        tensors.update({n: f.read(n) for n in f.names()})
        os.remove(path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    edit(tensors)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((3, 64), np.float32)}),
     "'model.layers.0.mlp.up_proj.weight' has shape (3, 64), config implies (128, 64)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros((64,), np.float32)}),
     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
])
def test_bad_tensors_are_named(hf_model_dir, edit, message):
    _, folder = hf_model_dir()
    _rewrite_single_file(folder, edit)
    config = hf_io.read_hf_config(folder)
    with pytest.raises(ValueError) as e:
        hf_io.read_hf_params(folder, config)
    assert message in str(e.value) and folder in str(e.value)  # names the tensor and where it is


def test_index_naming_a_missing_shard(hf_model_dir):
    _, folder = hf_model_dir(max_shard_size="20KB")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        hf_io.TensorIndex(folder)


# ---- safetensors_io ------------------------------------------------------------------------------
def test_safetensors_round_trip_and_library_compatibility(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {
        "bf16": rng.normal(size=(5, 3)).astype(ml_dtypes.bfloat16),
        "f32_transposed_view": rng.normal(size=(4, 6)).astype(np.float32).T,
        "i64": np.arange(7, dtype=np.int64),
        "scalar": np.float32(2.5).reshape(()),
        "empty": np.zeros((0, 3), np.float16),
    }
    ours = str(tmp_path / "ours.safetensors")
    write_safetensors(ours, tensors, metadata={"format": "pt"})
    f = SafetensorsFile(ours)
    assert f.metadata == {"format": "pt"}
    for name, value in tensors.items():
        got = f.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == np.ascontiguousarray(value).tobytes(), name
    lib = load_file(ours)  # the reference library reads what we write ...
    assert np.array_equal(lib["i64"], tensors["i64"]) and lib["scalar"].shape == ()
    theirs = str(tmp_path / "theirs.safetensors")
    save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, theirs)
    np.testing.assert_array_equal(SafetensorsFile(theirs).read("x"), np.arange(6).reshape(2, 3))  # ... and back


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "shorter than its 8-byte header length"),
    (struct.pack("<Q", 10**12) + b"{}", "declared length"),
    (struct.pack("<Q", 6) + b"{nope}", "corrupt safetensors header"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (lambda: _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}) + b"\0" * 8,
     "tensor 'w' has offsets"),
    (lambda: _header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
     "header entry for tensor 'w'"),
])
def test_corrupt_safetensors_is_a_named_error(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content() if callable(content) else content)
    with pytest.raises(ValueError) as e:
        SafetensorsFile(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def _header(header: dict) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob
