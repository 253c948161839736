"""What the model trains on, made visible: `lima-data export` (JSONL) and `lima-data stats` (counts, lengths, PNG)."""
from __future__ import annotations

import collections
import json
from typing import Optional

import numpy as np

from data_pipeline import tasks
from lima_jax.atomic import atomic_write, atomic_write_text
from data_pipeline.inputs import epoch_order

PERCENTILES = (50, 90, 95, 99)


def export_jsonl(data_dir: str, mixture: str, split: str, tokenizer_path: str, max_len: int, out: str,
                 seed: int = 0, epoch: int = 0) -> int:
    """One epoch of `mixture` as {"source", "input_ids", "loss_mask"} lines (unpadded, truncated to max_len),
    in the order TrainInput visits them for (seed, epoch). Returns the number of lines."""
    tasks.register(data_dir, tokenizer_path, mixture=mixture)
    examples = tasks.load_examples(mixture, split=split, max_len=max_len)
    lines = []
    for i in epoch_order(seed, epoch, len(examples)):
        ex = examples[i]
        lines.append(json.dumps({"source": ex["source"], "input_ids": ex["targets"].tolist(),
                                 "loss_mask": ex["loss_mask"].tolist()}) + "\n")
    atomic_write_text(out, "".join(lines))
    return len(lines)


def compute_stats(data_dir: str, mixture: str, split: str, tokenizer_path: str, max_len: int) -> dict:
    """Counts per source, token-length percentiles (before truncation) and the share truncated at max_len."""
    tasks.register(data_dir, tokenizer_path, mixture=mixture)
    examples = tasks.load_examples(mixture, split=split, max_len=None)
    lengths = np.array([len(ex["targets"]) for ex in examples])
    counts = collections.Counter(ex["source"] for ex in examples)
    stats = {"mixture": mixture, "split": split, "num_examples": len(examples), "max_len": max_len,
             "per_source": dict(sorted(counts.items())),
             "length_percentiles": {}, "max_length": 0, "percent_truncated": 0.0,
             "loss_tokens": int(sum(int(ex["loss_mask"][:max_len].sum()) for ex in examples))}
    if len(lengths):
        stats["length_percentiles"] = {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES}
        stats["max_length"] = int(lengths.max())
        stats["percent_truncated"] = float(100.0 * np.mean(lengths > max_len))
    stats["_lengths"] = lengths
    return stats


def plot_lengths(lengths: np.ndarray, max_len: int, png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(lengths) // 2)), color="#4C72B0")
    ax.axvline(max_len, color="#C44E52", linestyle="--", label=f"max_len {max_len}")
    ax.set_xlabel("tokens per example (chat format)")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def stats_report(data_dir: str, mixture: str, split: str, tokenizer_path: str, max_len: int,
                 png: Optional[str] = None, packing_batch: Optional[int] = None) -> dict:
    """The mixture's statistics; with packing_batch, also the computed/real token ratio of one epoch at
    that batch size, padded and packed (lima-train's own input, one host)."""
    stats = compute_stats(data_dir, mixture, split, tokenizer_path, max_len)
    lengths = stats.pop("_lengths")
    if png:
        plot_lengths(lengths, max_len, png, f"{mixture} ({split}): {len(lengths)} examples")
    if packing_batch:
        from data_pipeline.inputs import TrainInput

        ratios = {}
        for packing in (False, True):
            it = TrainInput(mixture, data_dir, tokenizer_path, packing_batch, max_len, 0, split=split, packing=packing)
            computed = real = 0
            for _ in range(it.steps_per_epoch):
                batch = next(it)
                computed += batch["decoder_input_tokens"].size
                real += int((batch["decoder_segment_ids"] > 0).sum())
            ratios["packed" if packing else "padded"] = computed / max(real, 1)
        stats["packing"] = {"batch_size": packing_batch, "computed_per_real": ratios}
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"mixture {stats['mixture']} split {stats['split']}: {stats['num_examples']} examples"]
    lines += [f"  {source:16s} {n}" for source, n in stats["per_source"].items()]
    pct = ", ".join(f"{k} {v:.0f}" for k, v in stats["length_percentiles"].items())
    lines.append(f"  tokens: {pct}, max {stats['max_length']}")
    lines.append(f"  truncated at {stats['max_len']}: {stats['percent_truncated']:.1f}%")
    lines.append(f"  loss tokens (after truncation): {stats['loss_tokens']}")
    if "packing" in stats:
        r = stats["packing"]["computed_per_real"]
        lines.append(f"  computed/real tokens at batch {stats['packing']['batch_size']}: padded {r['padded']:.2f}, "
                     f"packed {r['packed']:.2f}")
    return "\n".join(lines)
