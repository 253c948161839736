"""Training throughput on this machine: lima-train's step vs a transformers + torch AdamW step.

The 58M config (hidden 512, 8 layers, 8 heads, FFN 1376, vocab 32000), batch 4 × 512, float32 on CPU,
random weights on each side; plus MFU of each against a float32 matmul peak measured here (XLA 2048³
matmul). Run by hand, on an idle machine:
    JAX_PLATFORMS=cpu python tools/bench_train.py [--steps 20] [--json out.json]
Our step is the very one lima-train runs (`train_step.build_train_step`), on a 1-device mesh. The two sides' steps alternate; speedup_vs_torch compares their
medians, with a bootstrap 95% interval over (ours, torch) pairs and a verdict on the ≥ 1× goal
that says "undecided" when the interval straddles it; speedup_paired_median is the median over
neighbouring (ours, torch) steps of their ratio, which a slow spell of this shared VM hits on both
sides alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
              max_position_embeddings=512)
BATCH, SEQ = 4, 512


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n ** 3 / best


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and widest x86 vector ISA ("AVX-512", "AVX2", ...), e.g. "Intel(R) Xeon(R)
    Processor @ 2.50GHz, AVX-512": the ratio to PyTorch depends on it (PyTorch's and XLA's matrix
    products compare differently on AVX-512 and AVX2 machines), so every figure should carry it.
    "unknown" where the file is absent (not Linux)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags),
               "no AVX")
    return f"{fields.get('model name', 'unknown model')}, {isa}"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def batch_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG["vocab_size"], size=(BATCH, SEQ + 1)).astype(np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((BATCH, SEQ), np.float32)}


def jax_step(remat: str):
    """(run one step, flops per step, compile seconds, scan_layers): lima-train's compiled step on a
    1-device mesh."""
    import jax

    from lima_jax import mesh as mesh_lib, sharding, train_step
    from lima_jax.config import LlamaConfig
    from lima_jax.optimizer import Recipe
    from lima_jax.recipe import model_config

    # Through lima-train's own model_config: its CPU choices (layers unrolled) apply here too.
    config = model_config(base=LlamaConfig(**CONFIG), dtype="float32", param_dtype="float32",
                                remat_policy=remat, platform="cpu")
    r = Recipe(1, BATCH, SEQ, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = train_step.build_train_step(config, r, mesh, sharding.DEFAULT_RULES, (), total_steps=1000)
    state = train_step.init_state(config, ts, 0, None)
    batch = {k: jax.device_put(v, ts.batch_sharding) for k, v in batch_arrays().items()}
    t = time.perf_counter()
    compiled = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile()
    compile_s = time.perf_counter() - t

    def step():
        nonlocal state
        state, m = compiled(state, batch)
        return float(m["loss"])  # waits for the step

    return step, train_step.model_flops_per_step(config, BATCH, SEQ), compile_s, config.scan_layers


def torch_step():
    """(run one step, torch threads): transformers' LlamaForCausalLM (its default attention, SDPA) and
    torch AdamW with the same hyperparameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=CONFIG["vocab_size"], hidden_size=CONFIG["hidden_size"],
        intermediate_size=CONFIG["intermediate_size"], num_hidden_layers=CONFIG["num_layers"],
        num_attention_heads=CONFIG["num_heads"], max_position_embeddings=CONFIG["max_position_embeddings"],
        attention_dropout=0.0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    b = batch_arrays()
    inputs = torch.tensor(b["decoder_input_tokens"], dtype=torch.long)
    labels = torch.tensor(b["decoder_target_tokens"], dtype=torch.long)

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, torch.get_num_threads()


def paired_speedup(ours_s: list, theirs_s: list) -> float:
    """Median of torch/ours over each torch step and the steps of ours just before and after it."""
    ratios = [t / o for i, t in enumerate(theirs_s) for o in ours_s[i:i + 2]]
    return float(np.median(ratios))


def speedup_interval(ours_s: list, theirs_s: list, level: float = 0.95, resamples: int = 2000) -> tuple:
    """A bootstrap interval for the ratio of medians (torch / ours): steps are resampled in
    (ours, torch) pairs, the neighbours that ran under the same background load."""
    ours, theirs = np.asarray(ours_s), np.asarray(theirs_s)
    rows = np.random.default_rng(0).integers(0, len(ours), size=(resamples, len(ours)))
    ratios = np.median(theirs[rows], axis=1) / np.median(ours[rows], axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))


def verdict(interval: tuple, goal: float = 1.0, level: float = 0.95) -> str:
    """Met or not met only when the whole interval (at `level`) lies on one side of the goal."""
    low, high = interval
    if low >= goal:
        return f"met: the whole {level:.0%} interval is at or above {goal}x"
    if high < goal:
        return f"not met: the whole {level:.0%} interval is below {goal}x"
    return f"undecided: the {level:.0%} interval straddles {goal}x (this VM's noise exceeds the difference)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side, alternating (medians compared)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per side first: with one warm-up step, our 2nd and 3rd steps "
                             "still spent 1.7-2.8 s each in the kernel (page faults while the heap both "
                             "sides share grows), which a long run never sees again")
    parser.add_argument("--remat", default="none", help="our remat policy (none, full, dots, ...)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    peak = matmul_peak()
    ours, flops, compile_s, scan = jax_step(args.remat)
    theirs, threads = torch_step()
    for _ in range(args.warmup):  # alternating too, as the heap both sides share settles
        ours(), theirs()
    ours_s, theirs_s = [], []
    for _ in range(args.steps):  # alternating, so drifting background load hits both alike
        ours_s.append(_timed(ours))
        theirs_s.append(_timed(theirs))
    tokens = BATCH * SEQ
    ours_med, theirs_med = float(np.median(ours_s)), float(np.median(theirs_s))
    interval = speedup_interval(ours_s, theirs_s)
    result = {
        "cpu": cpu_description(), "config": CONFIG, "batch": BATCH, "seq_len": SEQ, "matmul_peak_gflops": peak / 1e9,
        "ours_tokens_per_s": tokens / ours_med, "torch_tokens_per_s": tokens / theirs_med,
        "speedup_vs_torch": theirs_med / ours_med, "speedup_ci95": interval,
        "goal_1x": verdict(interval), "speedup_paired_median": paired_speedup(ours_s, theirs_s),
        "speedup_best_vs_best": min(theirs_s) / min(ours_s),
        "ours_mfu": flops / ours_med / peak, "torch_mfu": flops / theirs_med / peak,
        "ours_step_s": ours_s, "torch_step_s": theirs_s, "ours_compile_s": compile_s,
        "torch_threads": threads, "warmup_steps": args.warmup, "remat": args.remat, "scan_layers": scan,
        "load_average": os.getloadavg()[0],
    }
    for k, v in result.items():
        if isinstance(v, (list, tuple)):
            v = " ".join(f"{x:.3f}" for x in v)
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
