"""`lima-data`: build the TFDS data, export / inspect what the model trains on, curate raw sources, demo data.

  lima-data build   --manual_dir DIR --data_dir TFDS_DIR [--skip_invalid]
  lima-data export  --data_dir D --mixture M --split S --tokenizer T --max_len 2048 --out F.jsonl
  lima-data stats   --data_dir D --mixture M --split S --tokenizer T --max_len 2048 [--png F.png]
  lima-data curate  stackexchange|natinst|wikihow|writingprompts ... --out F.jsonl
  lima-data demo    --out DIR     (demo JSONL + demo tokenizer, then the TFDS build into DIR/tfds)
Errors print one line, `lima-data: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Optional, Sequence

from lima_jax.cli.errors import input_error

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter hides the one-line results


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", required=True, help="TFDS data dir holding the prepared `lima`")
    p.add_argument("--mixture", default="lima_1k")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", required=True, help="sentencepiece tokenizer.model")
    p.add_argument("--max_len", type=int, default=2048)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lima-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="validate LIMA JSONL and prepare TFDS `lima`")
    p.add_argument("--manual_dir", required=True, help="folder with train.jsonl (+ dev.jsonl, test.jsonl)")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--skip_invalid", action="store_true", help="skip bad lines (and report them) instead of failing")

    p = sub.add_parser("export", help="one epoch as JSONL {source, input_ids, loss_mask}")
    _data_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="the training seed whose epoch order to write")
    p.add_argument("--epoch", type=int, default=0)

    p = sub.add_parser("stats", help="counts per source, token lengths, %% truncated, histogram PNG")
    _data_args(p)
    p.add_argument("--png", default=None, help="where to write the length histogram")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    p.add_argument("--packing", action="store_true",
                   help="also the computed/real token ratio of an epoch, padded and packed (lima-train's input)")
    p.add_argument("--batch_size", type=int, default=32, help="with --packing: examples per step (LIMA: 32)")

    p = sub.add_parser("curate", help="LIMA §2.1 curation from raw sources")
    cur = p.add_subparsers(dest="curator", required=True)
    c = cur.add_parser("stackexchange", help="Posts.xml dumps -> pairs")
    c.add_argument("--posts", action="append", required=True, help="Posts.xml, or SITE=Posts.xml (repeatable)")
    c.add_argument("--min_score", type=int, default=10)
    c.add_argument("--min_chars", type=int, default=1200)
    c.add_argument("--max_chars", type=int, default=4096)
    c.add_argument("--stem_quota", type=int, default=200)
    c.add_argument("--other_quota", type=int, default=200)
    c.add_argument("--temperature", type=float, default=3.0)
    c.add_argument("--stem_sites", default=None, help="comma-separated site names counted as STEM")
    c = cur.add_parser("natinst", help="Super-NaturalInstructions task JSON -> one pair per task")
    c.add_argument("--tasks", nargs="+", required=True, help="task JSON files or folders")
    c.add_argument("--max_tasks", type=int, default=None)
    c = cur.add_parser("wikihow", help="wikiHow rows (title, headline, text) -> pairs")
    c.add_argument("--rows", required=True, help="CSV or JSONL")
    c.add_argument("--n", type=int, default=200)
    c.add_argument("--min_chars", type=int, default=500)
    c.add_argument("--max_chars", type=int, default=4096)
    c = cur.add_parser("writingprompts", help="WritingPrompts *.wp_source / *.wp_target -> pairs")
    c.add_argument("--source", required=True)
    c.add_argument("--target", required=True)
    c.add_argument("--n", type=int, default=150)
    c.add_argument("--min_chars", type=int, default=500)
    c.add_argument("--max_chars", type=int, default=4096)
    for c in cur.choices.values():
        c.add_argument("--out", required=True)
        c.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="write the project's demo data and tokenizer, and build TFDS from it")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab_size", type=int, default=None)
    p.add_argument("--no_build", action="store_true", help="only the JSONL and the tokenizer")
    return parser


def _build(args) -> None:
    from data_pipeline import lima_dataset
    info = lima_dataset.build(args.manual_dir, args.data_dir, skip_invalid=args.skip_invalid)
    for message in info["skipped"]:
        print(f"skipped {message}")
    splits = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
    print(f"built lima {lima_dataset.DATA_VERSION} in {args.data_dir}: {splits}; skipped {len(info['skipped'])}")


def _export(args) -> None:
    from data_pipeline.export import export_jsonl
    n = export_jsonl(args.data_dir, args.mixture, args.split, args.tokenizer, args.max_len, args.out,
                     seed=args.seed, epoch=args.epoch)
    print(f"wrote {n} examples of {args.mixture} ({args.split}) to {args.out}")


def _stats(args) -> None:
    from lima_jax.atomic import atomic_write_text
    from data_pipeline.export import format_stats, stats_report
    stats = stats_report(args.data_dir, args.mixture, args.split, args.tokenizer, args.max_len, args.png,
                         packing_batch=args.batch_size if args.packing else None)
    print(format_stats(stats))
    if args.png:
        print(f"histogram: {args.png}")
    if args.json:
        atomic_write_text(args.json, json.dumps(stats, indent=1) + "\n")


def _curate(args) -> None:
    from data_pipeline.curate import common
    if args.curator == "stackexchange":
        from data_pipeline.curate import stackexchange
        kwargs = {} if args.stem_sites is None else {"stem_sites": frozenset(args.stem_sites.split(","))}
        result = stackexchange.curate(args.posts, args.stem_quota, args.other_quota, args.temperature, args.seed,
                                      args.min_score, args.min_chars, args.max_chars, **kwargs)
    elif args.curator == "natinst":
        from data_pipeline.curate import natinst
        result = natinst.curate(args.tasks, seed=args.seed, max_tasks=args.max_tasks)
    elif args.curator == "wikihow":
        from data_pipeline.curate import wikihow
        result = wikihow.curate(args.rows, n=args.n, seed=args.seed, min_chars=args.min_chars,
                                max_chars=args.max_chars)
    else:
        from data_pipeline.curate import writingprompts
        result = writingprompts.curate(args.source, args.target, n=args.n, seed=args.seed,
                                       min_chars=args.min_chars, max_chars=args.max_chars)
    common.write_pairs(result.pairs, args.out)
    print(result.report(args.curator))
    print(f"wrote {len(result.pairs)} pairs to {args.out}")


def _demo(args) -> None:
    from data_pipeline import demo_data
    manual = os.path.join(args.out, "manual")
    demo_data.write_demo_data(manual)
    vocab = args.vocab_size or demo_data.DEMO_VOCAB_SIZE
    tok = demo_data.train_demo_tokenizer(args.out, vocab_size=vocab)
    print(f"demo data: {manual}/{{train,dev,test}}.jsonl; tokenizer {tok} ({vocab} pieces, EOT id {vocab})")
    if not args.no_build:
        from data_pipeline import lima_dataset
        tfds_dir = os.path.join(args.out, "tfds")
        info = lima_dataset.build(manual, tfds_dir)
        print(f"built lima in {tfds_dir}: " + ", ".join(f"{s} {n}" for s, n in info["splits"].items()))


COMMANDS = {"build": _build, "export": _export, "stats": _stats, "curate": _curate, "demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError, ET.ParseError) as e:
        # InvalidLimaLine is a ValueError whose text is already `FILE:LINE: what is wrong`.
        return input_error(parser.prog, e)
    except KeyError as e:
        return input_error(parser.prog, ValueError(f"missing field {e}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
