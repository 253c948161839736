"""lima-chat: an interactive multi-turn chat with a checkpoint (logic in lima_jax.chat; sampling
defaults in gin/runs/lima_decode.gin)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lima-chat", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="Hugging Face folder, converted checkpoint or model_dir")
    p.add_argument("--tokenizer", help="sentencepiece model (default: tokenizer.model in the checkpoint folder)")
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--greedy", action="store_true", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--gin_file", action="append", default=[], help="default: runs/lima_decode.gin")
    p.add_argument("--gin_bindings", action="append", default=[])
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lima_jax import chat, eval_decoder
    from lima_jax.checkpoint import load_pretrained

    flags = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "greedy")
    try:
        settings = eval_decoder.load_settings(args.gin_file, args.gin_bindings, {k: getattr(args, k) for k in flags})
        tokenizer = eval_decoder.resolve_tokenizer(args.checkpoint, args.tokenizer)
        session = chat.ChatSession(load_pretrained(args.checkpoint, dtype=args.dtype), tokenizer, settings)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    chat.run(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
