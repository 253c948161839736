"""Decoding speed: our slot decoder vs transformers' `generate`, same model, settings and CPU.

    JAX_PLATFORMS=cpu python tools/bench_decode.py [--workload fixed|lima] [--batch_sizes 1 8] [--repeats 3]

A random 58M LLaMA (hidden 512, 8 layers, 8 heads, FFN 1376, vocab 32000) is built in transformers,
saved, and loaded with lima_jax.load_pretrained. Both sample with the paper's settings (top-p 0.9,
temperature 0.7, repetition penalty 1.2) from 64-token prompts, without stopping.

- fixed (always reported): exactly 128 new tokens per prompt, batches of 1 and 8 (ours: that many slots).
- lima: 32 prompts whose budgets follow LIMA answer lengths (the LIMA sample's answers in the LLaMA
  tokenizer, ÷ 4 (--budget_divisor), clipped to 8..512). Ours decodes them in 8 slots, refilled as prompts finish;
  transformers in static batches of 8 in the same order, each run to its longest budget. Useful
  tokens/s counts each prompt's own budget only; the ratio is ours over theirs, measured in the same
  run; occupancy is the fraction of our slot-steps that decoded a prompt.

Our compile time is measured apart and excluded; each figure is the best of `--repeats` timed runs,
the two implementations alternating so background load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

SETTINGS = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
TINY = dict(CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)  # for the tool's own test
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMA_SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "assets", "lima-sample", "train.sample.jsonl")
LLAMA_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "assets", "llama-tokenizer", "tokenizer.model")


def lima_budgets(n: int = 32, sample: str = LIMA_SAMPLE, tokenizer: str = LLAMA_TOKENIZER, divisor: int = 4,
                 low: int = 8, high: int = 512) -> list[int]:
    """New-token budgets of n prompts: the first n answers of the LIMA sample, in LLaMA tokens, ÷ divisor,
    clipped to [low, high]."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    with open(sample, encoding="utf-8") as f:
        answers = [json.loads(line)["conversations"][1] for line in f if line.strip()]
    if len(answers) < n:
        raise ValueError(f"{sample}: {len(answers)} answers, {n} needed")
    return [int(np.clip(len(sp.encode(a)) // divisor, low, high)) for a in answers[:n]]


def static_batch_steps(budgets, batch: int) -> list[int]:
    """The token count each static batch runs to: its longest budget."""
    return [max(budgets[i: i + batch]) for i in range(0, len(budgets), batch)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("fixed", "lima"), default="fixed",
                        help="lima: the LIMA-lengths workload, then the fixed-length figures")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--num_prompts", type=int, default=32, help="lima workload: prompts")
    parser.add_argument("--slots", type=int, default=8, help="lima workload: our slots = their static batch")
    parser.add_argument("--budget_divisor", type=int, default=4, help="lima workload: budget = answer length / this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (the tool's test)")
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lima_jax
    from lima_jax import decoding

    config = TINY if args.tiny else CONFIG
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        lm = lima_jax.load_pretrained(folder)
    print(f"model: {lm.config.num_params() / 1e6:.1f}M parameters; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")

    rng = np.random.RandomState(0)
    results = {}
    if args.workload == "lima":
        results["lima"] = _lima_workload(args, lm, hf, decoding,
                                         rng.randint(3, config["vocab_size"], (args.num_prompts, args.prompt_len)))
    n = args.new_tokens
    for batch in args.batch_sizes:
        prompts = rng.randint(3, config["vocab_size"], (batch, args.prompt_len))

        def ours():
            out = lm.generate(prompts.tolist(), max_new_tokens=n, stop_ids=[], batch_size=batch, **SETTINGS)
            assert all(len(t) == n for t in out)

        def theirs():
            ids = torch.tensor(prompts, dtype=torch.long)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, **SETTINGS)
            assert out.shape == (batch, args.prompt_len + n)

        compile_s = _timed(ours)  # first call: compilation and one run
        _timed(theirs)  # warm-up
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):
            ours_s.append(_timed(ours))
            theirs_s.append(_timed(theirs))
        ours_tps, theirs_tps = batch * n / min(ours_s), batch * n / min(theirs_s)
        print(f"batch {batch}: ours {ours_tps:7.1f} tok/s (first call incl. compile {compile_s:.1f} s), "
              f"transformers {theirs_tps:7.1f} tok/s, ratio {ours_tps / theirs_tps:.2f}x "
              f"(runs ours {_fmt(ours_s)}, transformers {_fmt(theirs_s)}; load {os.getloadavg()[0]:.1f})")
        results[f"batch {batch}"] = dict(ours_tps=ours_tps, theirs_tps=theirs_tps, ratio=ours_tps / theirs_tps)
    return results


def _lima_workload(args, lm, hf, decoding, prompts) -> dict:
    import torch

    budgets = lima_budgets(args.num_prompts, divisor=args.budget_divisor)
    useful = sum(budgets)
    stats = []

    def ours():
        gen = decoding.generate(lm, prompts.tolist(), budgets, seed=list(range(len(budgets))), stop_ids=[],
                                batch_size=args.slots, **SETTINGS)
        assert [len(t) for t in gen.tokens] == budgets
        stats.append(gen.stats)

    def theirs():
        for start, steps in zip(range(0, len(budgets), args.slots), static_batch_steps(budgets, args.slots)):
            ids = torch.tensor(prompts[start: start + args.slots], dtype=torch.long)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=steps,
                                  min_new_tokens=steps, pad_token_id=0, **SETTINGS)
            assert out.shape == (len(ids), args.prompt_len + steps)

    compile_s = _timed(ours)
    _timed(theirs)  # warm-up (torch's first run at each new shape is slow)
    ours_s, theirs_s = [], []
    for _ in range(args.repeats):
        ours_s.append(_timed(ours))
        theirs_s.append(_timed(theirs))
    ours_tps, theirs_tps = useful / min(ours_s), useful / min(theirs_s)
    paired = sorted(t / o for o, t in zip(ours_s, theirs_s))
    occupancy = stats[-1].occupancy
    static_slots = sum(static_batch_steps(budgets, args.slots)) * args.slots
    print(f"lima workload: {len(budgets)} prompts of {args.prompt_len} tokens, budgets {min(budgets)}..{max(budgets)} "
          f"(sum {useful}; static batches of {args.slots} run {static_slots} token-slots)")
    print(f"lima: ours {ours_tps:7.1f} useful tok/s in {args.slots} slots, occupancy {occupancy:.1%} "
          f"(first call incl. compile {compile_s:.1f} s); transformers static batches {theirs_tps:7.1f} useful tok/s; "
          f"ratio {ours_tps / theirs_tps:.2f}x (paired runs {'/'.join(f'{r:.2f}' for r in paired)}; "
          f"runs ours {_fmt(ours_s)}, transformers {_fmt(theirs_s)}; load {os.getloadavg()[0]:.1f})")
    return dict(ours_tps=ours_tps, theirs_tps=theirs_tps, ratio=ours_tps / theirs_tps, occupancy=occupancy,
                budgets=budgets)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fmt(seconds) -> str:
    return "/".join(f"{s:.2f}" for s in seconds) + " s"


if __name__ == "__main__":
    main()
