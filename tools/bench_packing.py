"""Packed vs padded LIMA training on this machine: one epoch of the LIMA sample, train-step time.

The demo architecture (the `tiny` preset) with the LLaMA tokenizer's vocabulary (+ EOT), MAX_LEN
2048, batch 32, the LIMA recipe (gin/runs/lima_sft.gin) with dropout off so both sides compute the
same thing; the data is `../shared`'s LIMA sample built into TFDS here (or --data_dir). The step is
the one lima-train runs (`train_step.build_train_step`), fed by lima-train's own input
(`data_pipeline.inputs.TrainInput`, packing on or off). Each side's rows compile once before timing.
Epochs alternate (padded, packed, padded, ...); the figure is train-step seconds per epoch, and the
ratio padded/packed is reported as the median over neighbouring (padded, packed) epochs with its
range. Run by hand, on an idle machine:
    JAX_PLATFORMS=cpu python tools/bench_packing.py [--repeats 3] [--microbatches 4] [--json out.json]
--microbatches splits each step (both sides alike) so the [rows, 2048, 32001] logits fit in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "assets")
LIMA_SAMPLE = os.path.join(SHARED, "lima-sample", "train.sample.jsonl")
LLAMA_TOKENIZER = os.path.join(SHARED, "llama-tokenizer", "tokenizer.model")


def build_sample(work: str, sample: str = LIMA_SAMPLE) -> str:
    """TFDS `lima` data of the sample (as `lima-data build` makes it) under `work`; returns its data_dir."""
    from data_pipeline import lima_dataset

    manual = os.path.join(work, "manual")
    os.makedirs(manual, exist_ok=True)
    shutil.copy(sample, os.path.join(manual, "train.jsonl"))
    data_dir = os.path.join(work, "tfds")
    lima_dataset.build(manual, data_dir)
    return data_dir


class Side:
    """One way of laying out the steps (packed or padded): its input, compiled programs and state."""

    def __init__(self, packing: bool, data_dir: str, tokenizer: str, config, r, mesh, rules, fsdp_axes):
        from lima_jax.train_step import build_train_step, init_state
        from data_pipeline.inputs import TrainInput

        self.name = "packed" if packing else "padded"
        self.data = TrainInput("lima_1k", data_dir, tokenizer, r.batch_size, r.max_len, r.seed,
                               packing=packing, row_multiple=r.grad_accum_steps)
        self.steps = int(self.data.steps_per_epoch)
        self.ts = build_train_step(config, r, mesh, rules, fsdp_axes, total_steps=self.steps)
        self.state = init_state(config, self.ts, r.seed, None)
        self.mesh, self.rules, self.max_len = mesh, rules, r.max_len
        self.programs: dict = {}
        self.rows: list[int] = []
        self.real_tokens = 0

    def epoch_batches(self, epoch: int) -> list[dict]:
        import jax

        from lima_jax.train_step import BATCH_KEYS

        out = []
        for step in range(self.steps):
            local = self.data.batch(epoch, step)
            out.append({k: jax.device_put(np.asarray(local[k], d), self.ts.batch_sharding) for k, d in BATCH_KEYS.items()})
        return out

    def compile_for(self, batches: list[dict]) -> float:
        from lima_jax.train_step import abstract_batch

        t = time.perf_counter()
        for b in batches:
            rows = int(b["decoder_input_tokens"].shape[0])
            if rows not in self.programs:
                self.programs[rows] = self.ts.fn.lower(
                    self.ts.abstract_state, abstract_batch(rows, self.max_len, self.mesh, self.rules)).compile()
        return time.perf_counter() - t

    def run_epoch(self, batches: list[dict]) -> float:
        """Seconds in train steps for one epoch's batches (inputs already on the device)."""
        import jax

        total = 0.0
        self.rows, self.real_tokens = [], 0
        for b in batches:
            rows = int(b["decoder_input_tokens"].shape[0])
            t = time.perf_counter()
            self.state, metrics = self.programs[rows](self.state, b)
            metrics = jax.device_get(metrics)
            total += time.perf_counter() - t
            self.rows.append(rows)
            self.real_tokens += int(metrics["real_tokens"])
        return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="epochs per side, alternating (default 3)")
    p.add_argument("--microbatches", type=int, default=4, help="gradient-accumulation microbatches, both sides")
    p.add_argument("--max_len", type=int, default=2048)
    p.add_argument("--data_dir", help="TFDS data built by lima-data build (default: ../shared's LIMA sample)")
    p.add_argument("--tokenizer", default=LLAMA_TOKENIZER)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    for path in ([] if args.data_dir else [LIMA_SAMPLE]) + [args.tokenizer]:
        if not os.path.exists(path):
            print(f"bench_packing: error: {path} does not exist (../shared assets are needed)", file=sys.stderr)
            return 2

    import jax

    from lima_jax import gin_config, mesh as mesh_lib, recipe
    from lima_jax.config import preset
    from lima_jax.tokenizer import Tokenizer

    vocab = Tokenizer(args.tokenizer).vocab_size  # the sentencepiece pieces + EOT
    gin_config.parse(["models/tiny.gin", "runs/lima_sft.gin"],
                     [f"MAX_LEN={args.max_len}", "INIT_CHECKPOINT=None", "DATA_DIR=None", "TOKENIZER=None",
                      f"recipe.grad_accum_steps={args.microbatches}", "model_config.residual_dropout=0.0"],
                     skip_unknown=("train",))
    r = recipe.recipe()
    config = recipe.model_config(base=preset("tiny", vocab_size=vocab, max_position_embeddings=args.max_len))
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1], data=1, fsdp=1, tensor=1)
    rules, fsdp_axes = mesh_lib.logical_rules()

    work = tempfile.mkdtemp(prefix="bench-packing-")
    try:
        data_dir = args.data_dir or build_sample(work)
        sides = [Side(packing, data_dir, args.tokenizer, config, r, mesh, rules, fsdp_axes) for packing in (False, True)]
        batches = {s.name: s.epoch_batches(0) for s in sides}
        compile_s = {s.name: round(s.compile_for(batches[s.name]), 1) for s in sides}
        times = {s.name: [] for s in sides}
        for rep in range(args.repeats):
            for s in sides:
                times[s.name].append(s.run_epoch(batches[s.name]))
                print(f"epoch {rep + 1} {s.name}: {times[s.name][-1]:.2f} s in {len(s.rows)} steps of rows {s.rows}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in zip(times["padded"], times["packed"])]
    by_name = {s.name: s for s in sides}
    result = {
        "model": "tiny", "vocab_size": vocab, "max_len": args.max_len, "batch_size": r.batch_size,
        "microbatches": args.microbatches, "examples": len(by_name["padded"].data.examples),
        "steps_per_epoch": by_name["padded"].steps, "repeats": args.repeats,
        "device": jax.devices()[0].device_kind,
        **{f"{n}_epoch_s": [round(t, 3) for t in ts] for n, ts in times.items()},
        **{f"{n}_rows": by_name[n].rows for n in times},
        "computed_over_real": {n: round(sum(by_name[n].rows) * args.max_len / by_name[n].real_tokens, 3) for n in times},
        "compile_s": compile_s,
        "speedup_paired_median": round(float(np.median(ratios)), 2),
        "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
    }
    result["goal"] = ("met" if result["speedup_range"][0] >= 2.5 else "not met") + \
        " (≥ 2.5× train-step time, padded over packed, in every pair)"
    print(json.dumps(result, indent=2))
    if args.json:
        from lima_jax.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
