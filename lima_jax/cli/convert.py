"""lima-convert: HF ⇄ Orbax checkpoint conversion and a logit check (logic in lima_jax.convert)."""
from __future__ import annotations

import argparse
import sys

from lima_jax.cli.errors import INPUT_ERRORS, input_error

DTYPE_CHOICES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lima-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hf-to-orbax", help="Hugging Face folder -> converted checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: as stored)")
    p.add_argument("--add_eot", action="store_true", help="append <eot> (id = original vocabulary size)")
    p.add_argument("--vocab_padding_multiple", type=int, default=1,
                   help="pad embedding/LM-head rows to a multiple of this (padding is trimmed on export)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("orbax-to-hf", help="converted checkpoint or training model_dir -> Hugging Face folder")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None, help="training step (model_dir only; default latest)")
    p.add_argument("--max_shard_size", default="5GB")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("verify", help="compare logits of an HF folder and a checkpoint on random tokens")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="largest acceptable max abs logit difference")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lima_jax import convert

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        if args.command == "hf-to-orbax":
            convert.hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, add_eot=args.add_eot,
                                vocab_padding_multiple=args.vocab_padding_multiple, overwrite=args.overwrite,
                                log=log)
        elif args.command == "orbax-to-hf":
            convert.orbax_to_hf(args.ckpt_dir, args.out_dir, step=args.step, max_shard_size=args.max_shard_size,
                                dtype=args.dtype, overwrite=args.overwrite, log=log)
        else:
            result = convert.verify(args.hf_dir, args.ckpt_dir, batch=args.batch, length=args.length,
                                    seed=args.seed)
            print(f"max_abs_logit_diff={result['max_abs_diff']:.3e} kl={result['kl']:.3e} "
                  f"(batch {result['batch']} x {result['length']} tokens, vocab {result['vocab']}, tol {args.tol:g})")
            if not result["max_abs_diff"] <= args.tol:
                print(f"lima-convert: verify FAILED: max abs logit difference above --tol {args.tol:g}",
                      file=sys.stderr)
                return 1
    except INPUT_ERRORS as e:
        return input_error(parser.prog, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
