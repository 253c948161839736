"""lima-chat: an interactive multi-turn chat with a checkpoint (logic in lima_jax.chat; sampling
defaults in gin/runs/lima_decode.gin)."""
from __future__ import annotations

import argparse
import sys

from lima_jax.cli.errors import INPUT_ERRORS, input_error
from lima_jax.cli.sampling_args import add_model_args, add_sampling_args, settings_and_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lima-chat", description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from lima_jax import chat
        from lima_jax.checkpoint import load_pretrained

        settings, tokenizer = settings_and_tokenizer(args)
        session = chat.ChatSession(load_pretrained(args.checkpoint, dtype=args.dtype), tokenizer, settings)
    except INPUT_ERRORS as e:
        return input_error(parser.prog, e)
    chat.run(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
