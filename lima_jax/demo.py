"""`make demo`: the LIMA job end to end on the embedded default, offline, in a few minutes on a CPU.

    demo/raw/            the project's own LIMA-format demo data (train/dev/test JSONL)
    demo/tokenizer/      a small sentencepiece model trained on that text (EOT = its vocabulary size)
    demo/data/           the TFDS `lima` dataset (lima-data build)
    demo/run/            lima-train with gin/runs/demo.gin: checkpoints per epoch, TensorBoard, config
    demo/loss.png        the training loss curve
    demo/hf/             the last checkpoint exported to Hugging Face safetensors (lima-convert orbax-to-hf)
    demo/responses.jsonl lima-decode on the demo test prompts with the paper's sampling settings

Each stage calls the same entry point a user would (`main(argv)` of each console script), in this one
process. Rerunning reuses finished stages (training resumes; decoding skips answered prompts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional

from lima_jax.atomic import atomic_write

DEMO_DIR = "demo"


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def read_scalars(tensorboard_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar lima-train wrote, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    if tag in acc.Tags().get("scalars", []):
        return [(e.step, float(e.value)) for e in acc.Scalars(tag)]
    return [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def loss_curve(tensorboard_dir: str, png: str) -> list[tuple[int, float]]:
    """Reads the loss scalars lima-train wrote and plots them."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = read_scalars(tensorboard_dir, "loss")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("lima-train, gin/runs/demo.gin")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=120))
    return points


def _run(stage_main, argv: list[str]) -> None:
    """One stage through its console script's main(argv); a failed stage ends the demo with its status."""
    status = stage_main(argv)
    if status:
        raise SystemExit(status)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lima_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEMO_DIR, help="where everything goes (default: demo/)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="decode length for the demo answers")
    parser.add_argument("--epochs", type=int, default=20, help="NUM_EPOCHS for gin/runs/demo.gin (its own default: 3)")
    parser.add_argument("--max_len", type=int, default=512,
                        help="MAX_LEN for gin/runs/demo.gin (512 holds every demo conversation whole)")
    args = parser.parse_args(argv)

    from data_pipeline import cli as data_cli, demo_data
    from lima_jax import convert, model_dir
    from lima_jax.cli import convert as convert_cli, decode as decode_cli, train as train_cli

    out = os.path.abspath(args.out)
    if args.fresh and os.path.exists(out):
        shutil.rmtree(out)
    raw, tok_dir, data_dir, run_dir, hf_dir = (os.path.join(out, d) for d in ("raw", "tokenizer", "data", "run", "hf"))
    responses = os.path.join(out, "responses.jsonl")
    t_start = time.perf_counter()

    _stage("1/6 demo data and tokenizer (the project's own text)")
    files = demo_data.write_demo_data(raw)
    tokenizer = demo_data.train_demo_tokenizer(tok_dir)
    print(f"wrote {', '.join(os.path.relpath(f) for f in files.values())}; tokenizer {os.path.relpath(tokenizer)}")

    _stage("2/6 lima-data build")
    if not os.path.isdir(data_dir):
        _run(data_cli.main, ["build", "--manual_dir", raw, "--data_dir", data_dir])
    else:
        print(f"reusing {os.path.relpath(data_dir)}")

    _stage(f"3/6 lima-train --gin_file=gin/runs/demo.gin (NUM_EPOCHS={args.epochs}, MAX_LEN={args.max_len})")
    bindings = [f"DATA_DIR='{data_dir}'", f"TOKENIZER='{tokenizer}'", f"NUM_EPOCHS={args.epochs}",
                f"MAX_LEN={args.max_len}"]
    _run(train_cli.main, ["--gin_file", "runs/demo.gin", "--model_dir", run_dir]
         + [arg for b in bindings for arg in ("--gin_bindings", b)])
    shutil.copyfile(tokenizer, os.path.join(run_dir, "tokenizer.model"))  # the run is self-contained
    points = loss_curve(os.path.join(run_dir, model_dir.TENSORBOARD), os.path.join(out, "loss.png"))

    _stage("4/6 lima-convert orbax-to-hf (last checkpoint -> Hugging Face safetensors)")
    _run(convert_cli.main, ["orbax-to-hf", run_dir, hf_dir, "--overwrite"])
    check = convert.verify(hf_dir, run_dir, batch=2, length=24)  # transformers loads the export
    print(f"transformers LlamaForCausalLM.from_pretrained({os.path.relpath(hf_dir)}): max |logit diff| "
          f"{check['max_abs_diff']:.2e}, KL {check['kl']:.1e}")

    _stage("5/6 lima-decode on the demo test prompts (p 0.9, T 0.7, repetition penalty 1.2)")
    _run(decode_cli.main, ["--checkpoint", run_dir, "--prompts", files["test.jsonl"], "--output", responses,
                           "--tokenizer", tokenizer, "--max_new_tokens", str(args.max_new_tokens)])

    _stage("6/6 summary")
    with open(responses, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    first, last = points[0][1], points[-1][1]
    accuracy = read_scalars(os.path.join(run_dir, model_dir.TENSORBOARD), "accuracy")[-1][1]
    print(f"trained {points[-1][0]} steps: loss {first:.3f} -> {last:.3f}, final accuracy {accuracy:.3f}")
    print(f"checkpoints (one per epoch): steps {', '.join(str(s) for s in model_dir.list_checkpoint_steps(run_dir))}")
    print(f"HF export: {os.path.relpath(hf_dir)} ({', '.join(sorted(os.listdir(hf_dir)))})")
    print(f"{len(rows)} responses in {os.path.relpath(responses)}; the first:")
    if rows:
        print(f"  prompt:   {rows[0]['prompt'][:200]!r}")
        print(f"  response: {rows[0]['response'][:300]!r}")
    print(f"loss curve: {os.path.relpath(os.path.join(out, 'loss.png'))}; done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
