"""lima_jax/config.py: presets and Hugging Face config.json reading/writing."""
from __future__ import annotations

import pytest

from lima_jax.config import PRESETS, LlamaConfig, preset


def test_llama_65b_preset_is_the_paper_model():
    c = preset("llama_65b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size) == (80, 8192, 64, 22016, 32000)
    assert c.head_dim == 128 and c.num_kv_heads == 64
    assert 65.0e9 < c.num_params() < 65.5e9


@pytest.mark.parametrize("name,billions", [("llama_7b", 6.74), ("llama_13b", 13.0), ("llama_33b", 32.5),
                                           ("llama2_7b", 6.74), ("llama2_70b", 69.0)])
def test_preset_sizes(name, billions):
    assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_llama2_70b_uses_gqa():
    assert preset("llama2_70b").num_kv_heads == 8


def test_dropout_schedule_is_linear_from_zero_to_max():
    rates = preset("tiny", num_layers=5, residual_dropout=0.3).layer_dropout_rates()
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])


def test_hf_dict_round_trip_keeps_every_field():
    c = preset("tiny", rope_theta=500000.0, tie_word_embeddings=True, eot_token_id=511,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    back = LlamaConfig.from_hf_dict(c.to_hf_dict())
    assert back == c.replace(dtype="float32", param_dtype="float32")
    assert c.to_hf_dict()["eos_token_id"] == [2, 511]


def test_legacy_hf_fields():
    hf = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0})
    c = LlamaConfig.from_hf_dict(hf)
    assert c.rope_theta == 123.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.num_kv_heads == 4 and c.head_dim == 8


@pytest.mark.parametrize("change,message", [
    (dict(model_type="mistral"), "model_type is 'mistral'"),
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
])
def test_unsupported_hf_configs_are_named(change, message):
    hf = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4)
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(hf, source="x/config.json")


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        LlamaConfig.from_hf_dict(dict(model_type="llama", vocab_size=10))


def test_invalid_configs():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("llama_1t")
    with pytest.raises(ValueError, match="remat_policy"):
        preset("tiny", remat_policy="sometimes")


def test_json_round_trip(tmp_path):
    c = preset("llama2_70b", residual_dropout=0.3)
    c.save_json(str(tmp_path / "c.json"))
    assert LlamaConfig.load_json(str(tmp_path / "c.json")) == c
    assert hash(c) == hash(LlamaConfig.load_json(str(tmp_path / "c.json")))
