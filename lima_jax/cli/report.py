"""lima-report: preference / audit / Likert reports and judge templates (argument parsing only)."""
from __future__ import annotations

import argparse
import sys

from lima_jax import report
from lima_jax.cli.errors import input_error


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="write the report here as JSON (atomically)")
    p.add_argument("--plot", help="draw the figure here (PNG, or any format matplotlib knows by the suffix)")
    p.add_argument("--n_bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lima-report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preferences", help="pairwise preferences vs each opponent (LIMA Figure 1)")
    p.add_argument("annotations", help='JSONL: {prompt_id, model_a, model_b, annotator, preference: "a"|"b"|"tie"}')
    p.add_argument("--model", required=True, help="the model reported on (win = this model preferred)")
    _outputs(p)
    p = sub.add_parser("audit", help="Fail / Pass / Excellent absolute audit (LIMA Figure 3)")
    p.add_argument("labels", help='JSONL: {prompt_id, label: "fail"|"pass"|"excellent", model?}')
    _outputs(p)
    p = sub.add_parser("likert", help="1-6 helpfulness per model or condition (LIMA section 5)")
    p.add_argument("scores", help="JSONL: {prompt_id, score: 1..6, model?, condition?}")
    _outputs(p)
    p = sub.add_parser("template", help="print a judge prompt template to hand to your own judge")
    p.add_argument("name", choices=report.TEMPLATES)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common = {}
    if args.command != "template":
        common = dict(json_path=args.json, plot_path=args.plot, n_bootstrap=args.n_bootstrap, seed=args.seed)
    try:
        if args.command == "preferences":
            text = report.run_preferences(args.annotations, args.model, **common)
        elif args.command == "audit":
            text = report.run_audit(args.labels, **common)
        elif args.command == "likert":
            text = report.run_likert(args.scores, **common)
        else:
            text = report.load_template(args.name).rstrip("\n")
    except (report.ReportInputError, OSError) as e:
        return input_error(parser.prog, e)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
