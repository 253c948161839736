"""lima-decode: responses for LIMA-format prompts with the paper's sampling settings (logic in
lima_jax.eval_decoder; defaults in gin/runs/lima_decode.gin)."""
from __future__ import annotations

import argparse
import sys

from lima_jax.cli.errors import INPUT_ERRORS, input_error
from lima_jax.cli.sampling_args import add_model_args, add_sampling_args, settings_and_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lima-decode", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompts", required=True, help='JSONL, one {"id"?, "conversations": [user, ...]} per line')
    p.add_argument("--output", required=True, help="JSONL to append to; ids already there are skipped")
    p.add_argument("--sweep_checkpoints", metavar="EPOCHS",
                   help="with a model_dir: decode with each listed epoch's checkpoint (e.g. 5-10) into "
                        "OUTPUT with .epochN before the extension")
    p.add_argument("--batch_size", type=int,
                   help="slots: prompts decoded at once; a finished prompt's slot takes the next (default 8)")
    add_sampling_args(p)
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from lima_jax import eval_decoder
        from lima_jax.checkpoint import checkpoint_kind, load_pretrained

        settings, tokenizer = settings_and_tokenizer(args, ("batch_size",))
        eval_decoder.read_prompts(args.prompts)  # a bad prompt file fails before the model loads
        progress = not args.no_progress
        if args.sweep_checkpoints:
            if checkpoint_kind(args.checkpoint) != "model_dir":
                raise ValueError(f"{args.checkpoint}: --sweep_checkpoints needs a training model_dir")
            outputs = eval_decoder.sweep(args.checkpoint, tokenizer, args.prompts, args.output, settings,
                                         eval_decoder.parse_epochs(args.sweep_checkpoints), dtype=args.dtype,
                                         progress=progress)
            for epoch, path in outputs.items():
                print(f"epoch {epoch}: {path}")
        else:
            lm = load_pretrained(args.checkpoint, dtype=args.dtype)
            n = eval_decoder.decode_file(lm, tokenizer, args.prompts, args.output, settings,
                                         checkpoint=args.checkpoint, progress=progress)
            print(f"{n} responses appended to {args.output}")
    except INPUT_ERRORS as e:
        return input_error(parser.prog, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
