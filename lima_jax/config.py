"""LlamaConfig: the one description of a LLaMA architecture, its presets, and HF config.json I/O."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

# rope_scaling is a plain dict so it round-trips through JSON and gin unchanged:
#   None | {"rope_type": "linear", "factor": f}
#        | {"rope_type": "llama3", "factor": f, "low_freq_factor": a, "high_freq_factor": b,
#           "original_max_position_embeddings": n}
ROPE_TYPES = ("linear", "llama3")
# Activations a layer names for remat (jax.ad_checkpoint.checkpoint_name in model.py), and the named
# policies that save them: everything else in the layer is recomputed in the backward pass.
REMAT_SAVED_NAMES = {
    "qkv": ("query_proj", "key_proj", "value_proj"),
    "qkv_attn": ("query_proj", "key_proj", "value_proj", "attention_out"),
    "qkv_attn_mlp_in": ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_in"),
    # Every matmul's output the backward needs: only the norms and SwiGLU's product are recomputed.
    "qkv_attn_proj_gate_up": ("query_proj", "key_proj", "value_proj", "attention_out", "attention_proj",
                              "mlp_gate", "mlp_up"),
}
# "none" keeps every activation, "full" recomputes each layer; "dots*" save matmul outputs (jax's
# policies); a REMAT_SAVED_NAMES key saves those activations; "offload_<key>" keeps them in host
# memory instead of HBM (TPU). model.remat_policy maps each name to jax.checkpoint's policy.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", *REMAT_SAVED_NAMES,
                  *(f"offload_{k}" for k in REMAT_SAVED_NAMES))
# Attention without a KV cache: XLA's blocked attention (attention.py), the Pallas splash kernel
# (splash_attention.py, TPU) or cuDNN's flash attention (gpu_attention.py, NVIDIA GPUs). None in a
# config: by platform, see default_attention_kernel.
ATTENTION_KERNELS = ("xla", "splash", "cudnn")
CONFIG_FILE = "lima_config.json"  # a LlamaConfig as JSON, in converted checkpoints and training model_dirs


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None: same as num_heads (MHA)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_block: int = 128  # query rows per block of XLA's causal attention (attention.py; not the CPU fused calls)
    attention_kernel: Optional[str] = None  # ATTENTION_KERNELS; None: by platform (default_attention_kernel)
    residual_dropout: float = 0.0  # LIMA: 0.3 at the top layer, rising linearly from 0 at the bottom
    bos_token_id: int = 1
    eos_token_id: int = 2
    eot_token_id: Optional[int] = None  # set by `lima-convert --add_eot` (= original vocab size)
    vocab_padding_multiple: int = 1  # embedding/head rows padded to a multiple for even sharding

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention_block < 1:
            raise ValueError(f"attention_block={self.attention_block} must be >= 1")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={self.attention_kernel!r}; expected one of {ATTENTION_KERNELS} "
                             f"or None (by platform)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported; expected one of {ROPE_TYPES}")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ValueError(f"residual_dropout={self.residual_dropout} must be in [0, 1)")

    def __hash__(self):  # rope_scaling is a dict; the config must hash to be static in jit/NNX graphs
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head; rows past vocab_size are padding, never predicted."""
        m = self.vocab_padding_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def layer_dropout_rates(self) -> list[float]:
        """LIMA §3: layer l drops with rate max_rate * l / (L - 1); a single layer counts as the bottom."""
        if self.num_layers == 1:
            return [0.0]
        return [self.residual_dropout * l / (self.num_layers - 1) for l in range(self.num_layers)]

    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * f + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    # ---- JSON (this project's own checkpoints) -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load_json(cls, path: str) -> "LlamaConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "LlamaConfig":
        """Reads a transformers LlamaConfig dict: v5 `rope_parameters` and older `rope_theta`/`rope_scaling`."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}, only 'llama' is supported")
        for arch in hf.get("architectures") or []:
            if arch != "LlamaForCausalLM":
                raise ValueError(f"{source}: architecture {arch!r} is not supported (expected LlamaForCausalLM)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected silu)")
        try:
            rope_theta, rope_scaling = _read_rope(hf)
            fields = dict(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                bos_token_id=_first_id(hf.get("bos_token_id"), 1),
                eos_token_id=_first_id(hf.get("eos_token_id"), 2),
                eot_token_id=hf.get("eot_token_id"),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        eos = [self.eos_token_id] + ([self.eot_token_id] if self.eot_token_id is not None else [])
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "dtype": torch_dtype,
        }
        if self.eot_token_id is not None:
            d["eot_token_id"] = self.eot_token_id
        return d


def default_attention_kernel(platform: str) -> str:
    """The kernel for attention_kernel=None: Pallas splash on TPU (Mosaic runs only there), cuDNN on
    NVIDIA GPUs (JAX names their platform "gpu", their lowering platform "cuda"), XLA elsewhere."""
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _read_rope(hf: dict) -> tuple[float, Optional[dict]]:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(merged["factor"])}
    if kind == "llama3":
        return float(theta), {
            "rope_type": "llama3",
            "factor": float(merged["factor"]),
            "low_freq_factor": float(merged["low_freq_factor"]),
            "high_freq_factor": float(merged["high_freq_factor"]),
            "original_max_position_embeddings": int(merged["original_max_position_embeddings"]),
        }
    raise ValueError(f"rope type {kind!r} is not supported (expected default, linear or llama3)")


PRESETS: dict[str, LlamaConfig] = {
    # LLaMA-1 (Touvron et al. 2023, Table 2)
    "llama_7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
    "llama_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
    "llama_33b": LlamaConfig(hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52),
    "llama_65b": LlamaConfig(hidden_size=8192, intermediate_size=22016, num_layers=80, num_heads=64),
    # Llama-2
    "llama2_7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "llama2_70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
    # For tests and the demo: a few hundred thousand parameters.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=512,
    ),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
