"""Peak memory of lima-convert in both directions on a synthetic ~1.5 GB float32 checkpoint.

Writes a random LLaMA-shaped HF folder in 4 safetensors shards (one tensor in memory at a time),
then runs `hf-to-orbax` and `orbax-to-hf` each in its own process and reads that process's peak
RSS (os.wait4's ru_maxrss). The acceptance bound is 1 GB + 2 × the largest HF tensor. Finally it
checks the exported tensors equal the source ones, one tensor at a time. Not part of `make test`:

    JAX_PLATFORMS=cpu python tools/measure_convert_memory.py [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lima_jax import hf_io  # noqa: E402
from lima_jax.config import LlamaConfig  # noqa: E402
from lima_jax.safetensors_io import SafetensorsFile, iter_checkpoint_files, write_safetensors_lazy  # noqa: E402

# 32k vocabulary, 24 layers of width 1024: 374M parameters, 1.50 GB in float32.
CONFIG = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                     num_kv_heads=16, max_position_embeddings=2048)
GB = 10**9


def write_synthetic_hf(folder: str, config: LlamaConfig, shards: int = 4) -> tuple[int, int]:
    """Random float32 HF folder; returns (total bytes, largest tensor bytes)."""
    os.makedirs(folder)
    specs = []
    for hf_name, entry, _ in hf_io.iter_entries(config):
        shape = hf_io.hf_shape(entry, hf_io.unpadded_slice_shape(config, entry.path))
        seed = len(specs)
        specs.append((hf_name, shape, np.float32,
                      lambda shape=shape, seed=seed: np.random.default_rng(seed).standard_normal(shape, np.float32)))
    sizes = [int(np.prod(s[1])) * 4 for s in specs]
    total, start = sum(sizes), 0
    groups = [[] for _ in range(shards)]
    for spec, n in zip(specs, sizes):  # a tensor goes to the shard where its first byte falls
        groups[min(shards - 1, start * shards // total)].append(spec)
        start += n
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors_lazy(os.path.join(folder, name), group, metadata={"format": "pt"})
        weight_map.update({s[0]: name for s in group})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf_dict("float32"), f)
    return total, max(sizes)


def peak_rss_of(argv: list[str]) -> tuple[int, float]:
    """Runs argv; returns (peak RSS in bytes, seconds). Linux ru_maxrss is in KiB."""
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss * 1024, time.time() - start


def same_tensors(a: str, b: str) -> int:
    def index(folder):
        out = {}
        for path in iter_checkpoint_files(folder):
            f = SafetensorsFile(path)
            out.update({n: f for n in f.names()})
        return out
    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        raise SystemExit(f"tensor names differ: {sorted(set(ia) ^ set(ib))[:5]}")
    for name in ia:
        x, y = ia[name].read(name), ib[name].read(name)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            raise SystemExit(f"tensor {name} differs after the round trip")
    return len(ia)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the ~4.5 GB of files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="lima-convert-mem-")
    os.makedirs(work, exist_ok=True)
    hf, ckpt, out = (os.path.join(work, n) for n in ("hf", "ckpt", "out"))
    try:
        total, largest = write_synthetic_hf(hf, CONFIG)
        stacked = max(int(np.prod(s)) * 4 for s in hf_io.our_shapes(CONFIG).values())
        bound = GB + 2 * largest
        print(f"synthetic checkpoint: {total / GB:.3f} GB float32 in {len(list(iter_checkpoint_files(hf)))} shards, "
              f"largest HF tensor {largest / 1e6:.1f} MB, largest stacked array of ours {stacked / 1e6:.1f} MB; "
              f"bound 1 GB + 2 x largest = {bound / GB:.3f} GB")
        cli = [sys.executable, "-m", "lima_jax.cli.convert"]
        base, _ = peak_rss_of([sys.executable, "-c", "import lima_jax.convert, orbax.checkpoint, jax, sentencepiece"])
        print(f"baseline (imports only):  peak RSS {base / GB:.3f} GB")
        results = {}
        for name, cmd in (("hf-to-orbax", cli + ["hf-to-orbax", hf, ckpt]),
                          ("orbax-to-hf", cli + ["orbax-to-hf", ckpt, out, "--max_shard_size", "500MB"])):
            peak, secs = peak_rss_of(cmd)
            results[name] = peak
            verdict = "OK" if peak < bound else "OVER THE BOUND"
            print(f"{name:12s}  peak RSS {peak / GB:.3f} GB in {secs:.0f} s  ({peak / total:.2f} x the model; "
                  f"bound {bound / GB:.3f} GB: {verdict})")
        n = same_tensors(hf, out)
        print(f"round trip: all {n} tensors bit-identical")
        if any(p >= bound for p in results.values()):
            return 1
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
