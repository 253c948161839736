"""The flags lima-decode and lima-chat share: checkpoint, tokenizer, dtype, gin and sampling settings.
Unset sampling flags are None, so gin/runs/lima_decode.gin's values apply (eval_decoder.load_settings)."""
from __future__ import annotations

import argparse

SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "greedy")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="Hugging Face folder, converted checkpoint, or training model_dir (its latest checkpoint)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: tokenizer.model in the checkpoint folder)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--greedy", action="store_true", default=None, help="argmax instead of sampling")
    p.add_argument("--gin_file", action="append", default=[], help="default: runs/lima_decode.gin")
    p.add_argument("--gin_bindings", action="append", default=[], help="e.g. decode.top_p=0.95")


def sampling_overrides(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS + extra}


def settings_and_tokenizer(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """(decode settings, Tokenizer) from the shared flags: gin first, then the flags that were given."""
    from lima_jax import eval_decoder

    settings = eval_decoder.load_settings(args.gin_file, args.gin_bindings, sampling_overrides(args, extra))
    return settings, eval_decoder.resolve_tokenizer(args.checkpoint, args.tokenizer)
