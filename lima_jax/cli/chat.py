"""lima-chat: an interactive multi-turn chat with a checkpoint (logic in lima_jax.chat; sampling
defaults in gin/runs/lima_decode.gin)."""
from __future__ import annotations

import argparse
import sys

from lima_jax.cli.sampling_args import add_model_args, add_sampling_args, sampling_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lima-chat", description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lima_jax import cpu_tuning, chat, eval_decoder
    from lima_jax.checkpoint import load_pretrained

    cpu_tuning.keep_freed_memory()
    try:
        settings = eval_decoder.load_settings(args.gin_file, args.gin_bindings, sampling_overrides(args))
        tokenizer = eval_decoder.resolve_tokenizer(args.checkpoint, args.tokenizer)
        session = chat.ChatSession(load_pretrained(args.checkpoint, dtype=args.dtype), tokenizer, settings)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    chat.run(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
