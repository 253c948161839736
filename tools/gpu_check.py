"""Does lima-jax run right, and how fast, on this NVIDIA GPU? One line per check; exit 1 if one fails.

    python tools/gpu_check.py             # on a machine with NVIDIA GPUs (sized for < 8 min on one H100/H200)
    python tools/gpu_check.py --dry-run   # every check end to end with small shapes on the CPU (the test)

Run it from a checkout (it puts the repository on sys.path). It needs jax with CUDA (the `cuda` extra,
or jax[cuda12]==0.10.2), flax, optax, orbax-checkpoint, torch and transformers; not gin, seqio or
TensorFlow: the model, the train step and the decoder import without them.

- parity: our float32 logits vs transformers' LlamaForCausalLM on the same device (a random GQA model,
  highest matmul precision on both sides): max |difference| at most 1e-4.
- attention: the kernel the model picks on this platform (cuDNN on GPU; jax's XLA implementation of the
  same call on the CPU) vs attention.causal_attention, bfloat16, values and q/k/v gradients at every
  real query, against a float32 reference: within twice the XLA attention's own bfloat16 error. Unpacked
  rows run the fused kernel, packed rows its fallback.
- train: lima-train's compiled step (train_step.build_train_step: AdamW, float32 parameters, bfloat16
  compute, FSDP over all devices) of a ~1.1B LLaMA on packed rows of 2048 (LIMA-like example lengths,
  median 480): tokens/s and MFU against the GPU's published dense bf16 peak. Passes when the losses
  are finite, the first is near ln(vocab) (a random model's) and the MFU is in (0, 1].
- decode_fixed / decode_lima: tools/bench_decode.py's workloads with the same model in bfloat16, ours
  vs transformers' generate on the same GPU: batch 8 × 128 new tokens; the LIMA-length workload
  (32 prompts, budgets = LIMA answer lengths ÷ 4, 8 slots vs static batches of 8). Tokens/s and ratio.
- budget: the whole run under 8 minutes.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

BUDGET_S = 480
PARITY_TOL = 1e-4
# Published dense bf16 peaks, TFLOP/s per GPU, by device_kind (first match wins: variants before families).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
               ("A100", 312.0), ("B200", 2250.0))
# A TinyLlama-shaped LLaMA: 1.1B parameters, 22 layers, GQA 32/4 heads of 64.
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                num_kv_heads=4)
SIZES = {
    "gpu": dict(parity=dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                            num_kv_heads=2), parity_tokens=(2, 256),
                attention=(4, 2048, 32, 4, 64), train=MODEL_1B, rows=8, seq_len=2048, steps=8, warmup=2,
                decode=MODEL_1B, decode_dtype="bfloat16", prompt_len=64, new_tokens=128, batch=8, prompts=32,
                slots=8, budget_divisor=4, repeats=1),
    "dry": dict(parity=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2), parity_tokens=(2, 32),
                attention=(2, 128, 4, 2, 16), train=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                         num_layers=2, num_heads=4, num_kv_heads=2),
                rows=2, seq_len=128, steps=2, warmup=1,
                decode=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2), decode_dtype="float32", prompt_len=8, new_tokens=8, batch=2,
                prompts=4, slots=2, budget_divisor=32, repeats=1),
}


def hf_config(ours: dict, max_len: int):
    """transformers' LlamaConfig for our field names."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=ours["vocab_size"], hidden_size=ours["hidden_size"],
                       intermediate_size=ours["intermediate_size"], num_hidden_layers=ours["num_layers"],
                       num_attention_heads=ours["num_heads"], num_key_value_heads=ours["num_kv_heads"],
                       max_position_embeddings=max_len)


def random_hf_model(ours: dict, max_len: int, device: str, dtype, seed: int = 0):
    """A random transformers LlamaForCausalLM built on `device` (fast for 1B on a GPU), norms randomised
    too, in eval mode and `dtype`; no EOS, so generate runs to its budget."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config(ours, max_len))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()


def load_ours(hf, dtype: str):
    """lima_jax.load_pretrained of the transformers model, through a saved HF folder."""
    import lima_jax

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        return lima_jax.load_pretrained(folder, dtype=dtype)


# ---- the checks: each returns (ok, details) -------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def check_parity(sizes: dict, device: str):
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32 (the default on GPU is TF32)
    torch.backends.cudnn.allow_tf32 = False
    batch, length = sizes["parity_tokens"]
    hf = random_hf_model(sizes["parity"], length, device, torch.float32)
    lm = load_ours(hf, "float32")
    tokens = np.random.default_rng(0).integers(0, sizes["parity"]["vocab_size"], (batch, length))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, device=device)).logits.float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        ours = lm.logits(tokens)
    diff = float(np.abs(ours - theirs).max())
    p = sizes["parity"]
    return diff <= PARITY_TOL, (f"max_abs_diff={diff:.2e} (tol {PARITY_TOL:g}; float32, {batch}x{length} tokens, "
                                f"{p['num_layers']} layers, {p['num_heads']}/{p['num_kv_heads']} heads)")


def _attention_segments(kind: str, batch: int, length: int) -> np.ndarray:
    """Unpacked rows (one example from position 0, then padding) or packed ones (several, then padding)."""
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        if kind == "unpacked":
            ids[b, : length - 37 * b] = 1
        else:
            cuts = np.linspace(0, length - 29 * (b + 1), 4 + b).astype(int)
            for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
                ids[b, lo:hi] = s
    return ids


def check_attention(sizes: dict, platform: str):
    import jax
    import jax.numpy as jnp

    from lima_jax import gpu_attention
    from lima_jax.attention import causal_attention

    implementation = "cudnn" if platform == "gpu" else "xla"
    b, t, h, kvh, d = sizes["attention"]
    parts = []
    ok = True
    for kind in ("unpacked", "packed"):
        ids = jnp.asarray(_attention_segments(kind, b, t))
        keys = jax.random.split(jax.random.key(1), 4)
        q, k, v = (jax.random.normal(key, (b, t, n, d)).astype(jnp.bfloat16)
                   for key, n in zip(keys[:3], (h, kvh, kvh)))
        weights = jax.random.normal(keys[3], (b, t, h, d)) * (ids > 0)[:, :, None, None]

        def run(attention, dtype, q, k, v, ids, weights):
            def loss(q, k, v):
                return jnp.sum(attention(q, k, v, ids).astype(jnp.float32) * weights)

            q, k, v = (x.astype(dtype) for x in (q, k, v))
            out = attention(q, k, v, ids).astype(jnp.float32)
            return [out] + [g.astype(jnp.float32) for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]

        def fused(q, k, v, ids):
            return gpu_attention.cudnn_causal_attention(q, k, v, ids, implementation=implementation)

        real = np.asarray(ids > 0)
        reference, xla, ours = (jax.jit(functools.partial(run, attention, dtype))(q, k, v, ids, weights)
                                for attention, dtype in ((causal_attention, jnp.float32),
                                                         (causal_attention, jnp.bfloat16), (fused, jnp.bfloat16)))

        def error(result):  # the worst of output and q/k/v gradients, each relative to its largest entry
            pairs = [(result[0][real], reference[0][real])] + list(zip(result[1:], reference[1:]))
            return max(float(np.abs(np.asarray(x) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
                       for x, r in pairs)

        ours, theirs = error(ours), error(xla)
        unpacked = bool(gpu_attention.prefix_lengths(ids)[1])
        ok &= ours <= max(2 * theirs, 1e-2) and unpacked == (kind == "unpacked")
        path = implementation if unpacked else "xla fallback"
        parts.append(f"{kind} ({path}) rel_err={ours:.1e} vs xla_bf16 {theirs:.1e}")
    return ok, f"{'; '.join(parts)} ([{b},{t}] rows, {h}/{kvh} heads of {d}, bfloat16)"


def packed_batch(rows: int, seq_len: int, vocab: int, rng) -> dict:
    """A packed training batch: examples of LIMA-like lengths (log-normal, median 480), added while
    first-fit-decreasing keeps them in `rows` rows of seq_len; every token is a loss token."""
    from data_pipeline import packing

    lengths = []
    while True:
        n = int(np.clip(rng.lognormal(math.log(480 * seq_len / 2048), 0.9), 16, seq_len))
        if len(packing.first_fit_decreasing(lengths + [n], seq_len)) > rows:
            break
        lengths.append(n)
    tokens = rng.integers(3, vocab, (len(lengths), seq_len + 1)).astype(np.int32)
    weights = (np.arange(seq_len)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    features = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
                "decoder_loss_weights": weights}
    return packing.pack(features, lengths, list(range(len(lengths))), rows, seq_len)


def peak_flops(platform: str, devices) -> tuple[float, str]:
    """(bf16 peak FLOP/s of all devices, where it comes from): published per GPU; on the CPU (dry run)
    a measured float32 matmul (bench_train's)."""
    if platform != "gpu":
        import bench_train

        return bench_train.matmul_peak(512, 3) * len(devices), "measured matmul"
    kind = devices[0].device_kind
    for name, tflops in PEAK_TFLOPS:
        if name in kind:
            return tflops * 1e12 * len(devices), f"{tflops:g} TFLOP/s per {name}"
    return 0.0, f"no published peak for {kind!r}"


def check_train(sizes: dict, platform: str, remat: str):
    import jax

    from lima_jax import device_mesh, sharding, train_step
    from lima_jax.config import LlamaConfig, default_attention_kernel
    from lima_jax.optimizer import Recipe

    devices = jax.devices()
    seq_len = sizes["seq_len"]
    rows = -(-sizes["rows"] // len(devices)) * len(devices)  # the batch is split over every device (FSDP)
    # lima-train's choices on an accelerator: bf16 compute, f32 parameters and AdamW state, layers
    # scanned, the attention kernel by platform.
    config = LlamaConfig(**sizes["train"], max_position_embeddings=seq_len, dtype="bfloat16", param_dtype="float32",
                         remat_policy=remat, scan_layers=True)
    mesh = device_mesh.device_mesh(1, -1, 1, devices)
    r = Recipe(1, rows, seq_len, 1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 1, 0)
    ts = train_step.build_train_step(config, r, mesh, sharding.DEFAULT_RULES, ("fsdp",), total_steps=1000, rows=rows)
    state = train_step.init_state(config, ts, 0, None)
    batch = packed_batch(rows, seq_len, config.vocab_size, np.random.default_rng(0))
    real = int((batch["decoder_segment_ids"] > 0).sum())
    batch = {k: jax.device_put(v, ts.batch_sharding) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = ts.fn.lower(ts.abstract_state, ts.abstract_batch).compile()
    compile_s = time.perf_counter() - start
    losses, times = [], []
    for _ in range(sizes["warmup"] + sizes["steps"]):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[sizes["warmup"]:])
    peak, peak_source = peak_flops(platform, devices)
    mfu = train_step.model_flops_per_step(config, rows, seq_len) / step_s / peak if peak else None
    ok = all(math.isfinite(x) for x in losses) and abs(losses[0] - math.log(config.vocab_size)) < 1.0 \
        and (mfu is None or 0 < mfu <= 1)
    mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
    kernel = default_attention_kernel(platform)
    attention = f"attention {kernel}" + (" (packed rows: its XLA fallback)" if kernel == "cudnn" else "")
    return ok, (f"tokens_per_s={rows * seq_len / step_s:,.0f} real_tokens_per_s={real / step_s:,.0f} mfu={mfu_text} "
                f"({peak_source}; {_size(config.num_params())} params, {rows}x{seq_len} packed, "
                f"{real / rows / seq_len:.0%} real, {attention}, remat {remat}, {len(devices)} device(s), "
                f"step {step_s:.3f} s, "
                f"compile {compile_s:.0f} s, loss {losses[0]:.2f}->{losses[-1]:.2f})")


def check_decode(sizes: dict, device: str, workload: str, models: dict):
    import torch

    import bench_decode

    if not models:  # built once for both decode checks
        dtype = sizes["decode_dtype"]
        context = sizes["prompt_len"] + 512
        models["hf"] = random_hf_model(sizes["decode"], context, device, getattr(torch, dtype))
        models["ours"] = load_ours(models["hf"], dtype)
    hf, lm = models["hf"], models["ours"]
    rng = np.random.RandomState(0)
    vocab = sizes["decode"]["vocab_size"]
    if workload == "fixed":
        prompts = rng.randint(3, vocab, (sizes["batch"], sizes["prompt_len"]))
        r = bench_decode.fixed_workload(lm, hf, prompts, sizes["new_tokens"], sizes["repeats"])
        shape = f"batch {sizes['batch']} x {sizes['new_tokens']} new tokens"
    else:
        prompts = rng.randint(3, vocab, (sizes["prompts"], sizes["prompt_len"]))
        budgets = bench_decode.budgets_from_lengths(bench_decode.LIMA_ANSWER_LENGTHS[: sizes["prompts"]],
                                                    sizes["budget_divisor"])
        r = bench_decode.lima_workload(lm, hf, prompts, budgets, sizes["slots"], sizes["repeats"])
        shape = (f"{sizes['prompts']} prompts, budgets {min(budgets)}..{max(budgets)}, {sizes['slots']} slots, "
                 f"occupancy {r['occupancy']:.1%}")
    ok = r["ours_tps"] > 0 and r["theirs_tps"] > 0
    return ok, (f"ours_tokens_per_s={r['ours_tps']:,.1f} transformers_tokens_per_s={r['theirs_tps']:,.1f} "
                f"ratio={r['ratio']:.2f}x ({shape}; {sizes['decode_dtype']}, {_size(lm.config.num_params())} "
                f"params, prompts of {sizes['prompt_len']}; our first call incl. compile {r['compile_s']:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU: every check, end to end")
    parser.add_argument("--remat", default="none", help="the train check's remat policy (none, full, qkv_attn, ...)")
    parser.add_argument("--only", nargs="+", choices=("parity", "attention", "train", "decode_fixed", "decode_lima"),
                        help="run these checks only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX allocates GPU memory as it needs it, so torch (parity, decode) finds room beside it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch
    import transformers

    platform = jax.default_backend()
    devices = jax.devices()
    print(f"device: {devices[0].device_kind} x {len(devices)} ({platform}); jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}", flush=True)
    if not args.dry_run and (platform != "gpu" or not torch.cuda.is_available()):
        print(f"check platform: FAIL jax sees {platform}, torch CUDA {torch.cuda.is_available()}: no GPU for both "
              f"(install the cuda extra, or run --dry-run)", flush=True)
        return 1
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    device = "cpu" if args.dry_run else "cuda"
    models: dict = {}
    checks = {
        "parity": lambda: check_parity(sizes, device),
        "attention": lambda: check_attention(sizes, platform),
        "train": lambda: check_train(sizes, platform, args.remat),
        "decode_fixed": lambda: check_decode(sizes, device, "fixed", models),
        "decode_lima": lambda: check_decode(sizes, device, "lima", models),
    }
    failed = False
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            ok, details = check()
        except Exception as e:  # a check that crashes fails; the others still run
            ok, details = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        failed |= not ok
        print(f"check {name}: {'ok' if ok else 'FAIL'} {details} time_s={time.perf_counter() - start:.1f}", flush=True)
    total = time.perf_counter() - started
    failed |= total > BUDGET_S
    print(f"check budget: {'ok' if total <= BUDGET_S else 'FAIL'} total_s={total:.0f} (limit {BUDGET_S})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
