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
the two implementations alternating so background load hits both alike. The workloads
(`fixed_workload`, `lima_workload`) take any two models on any device: tools/gpu_check.py runs them
on a GPU.
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


# The first 32 answers of the LIMA sample in LLaMA tokens, as answer_lengths reads them (tested against it):
# for machines without the sample, the tokenizer or sentencepiece (tools/gpu_check.py).
LIMA_ANSWER_LENGTHS = (410, 526, 339, 592, 259, 332, 513, 452, 520, 451, 336, 356, 61, 86, 121, 470, 23, 215, 1958,
                       1379, 1607, 3082, 2633, 3612, 334, 2639, 9, 5, 50, 97, 33, 137)


def answer_lengths(n: int = 32, sample: str = LIMA_SAMPLE, tokenizer: str = LLAMA_TOKENIZER) -> list[int]:
    """The first n answers of the LIMA sample, in LLaMA tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    with open(sample, encoding="utf-8") as f:
        answers = [json.loads(line)["conversations"][1] for line in f if line.strip()]
    if len(answers) < n:
        raise ValueError(f"{sample}: {len(answers)} answers, {n} needed")
    return [len(sp.encode(a)) for a in answers[:n]]


def budgets_from_lengths(lengths, divisor: int = 4, low: int = 8, high: int = 512) -> list[int]:
    """New-token budgets: answer lengths ÷ divisor, clipped to [low, high]."""
    return [int(np.clip(n // divisor, low, high)) for n in lengths]


def lima_budgets(n: int = 32, sample: str = LIMA_SAMPLE, tokenizer: str = LLAMA_TOKENIZER, divisor: int = 4,
                 low: int = 8, high: int = 512) -> list[int]:
    """New-token budgets of n prompts: the first n answers of the LIMA sample, in LLaMA tokens, ÷ divisor,
    clipped to [low, high]."""
    return budgets_from_lengths(answer_lengths(n, sample, tokenizer), divisor, low, high)


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
        prompts = rng.randint(3, config["vocab_size"], (args.num_prompts, args.prompt_len))
        budgets = lima_budgets(args.num_prompts, divisor=args.budget_divisor)
        lima = lima_workload(lm, hf, prompts, budgets, args.slots, args.repeats)
        static_slots = sum(static_batch_steps(budgets, args.slots)) * args.slots
        print(f"lima workload: {len(budgets)} prompts of {args.prompt_len} tokens, budgets "
              f"{min(budgets)}..{max(budgets)} (sum {sum(budgets)}; static batches of {args.slots} run "
              f"{static_slots} token-slots)")
        print(f"lima: ours {lima['ours_tps']:7.1f} useful tok/s in {args.slots} slots, occupancy "
              f"{lima['occupancy']:.1%} (first call incl. compile {lima['compile_s']:.1f} s); transformers static "
              f"batches {lima['theirs_tps']:7.1f} useful tok/s; ratio {lima['ratio']:.2f}x (paired runs "
              f"{'/'.join(f'{r:.2f}' for r in lima['paired'])}; runs ours {_fmt(lima['ours_s'])}, transformers "
              f"{_fmt(lima['theirs_s'])}; load {os.getloadavg()[0]:.1f})")
        results["lima"] = lima
    for batch in args.batch_sizes:
        prompts = rng.randint(3, config["vocab_size"], (batch, args.prompt_len))
        fixed = fixed_workload(lm, hf, prompts, args.new_tokens, args.repeats)
        print(f"batch {batch}: ours {fixed['ours_tps']:7.1f} tok/s (first call incl. compile "
              f"{fixed['compile_s']:.1f} s), transformers {fixed['theirs_tps']:7.1f} tok/s, ratio "
              f"{fixed['ratio']:.2f}x (runs ours {_fmt(fixed['ours_s'])}, transformers {_fmt(fixed['theirs_s'])}; load "
              f"{os.getloadavg()[0]:.1f})")
        results[f"batch {batch}"] = fixed
    return results


def _hf_generate(hf, prompts, steps: int):
    """transformers' generate of exactly `steps` new tokens for each of `prompts` [B, P], with the paper's
    sampling, on the model's device; returns when the tokens are on the host."""
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=hf.device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=steps,
                          min_new_tokens=steps, pad_token_id=0, **SETTINGS)
    out = out.cpu()  # waits for the device
    assert out.shape == (len(ids), ids.shape[1] + steps)


def alternate(ours, theirs, repeats: int) -> tuple[float, list, list]:
    """(ours' first call: compile and one run, in s; ours' timed runs; theirs'): after one untimed run of
    theirs, the two alternate so background load hits both alike."""
    compile_s = _timed(ours)
    _timed(theirs)  # warm-up (torch's first run at each new shape is slow)
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(_timed(ours))
        theirs_s.append(_timed(theirs))
    return compile_s, ours_s, theirs_s


def fixed_workload(lm, hf, prompts, new_tokens: int, repeats: int) -> dict:
    """Exactly new_tokens for each prompt [B, P], ours in B slots vs one transformers batch: tokens/s of
    each (best run) and their ratio."""
    batch = len(prompts)

    def ours():
        out = lm.generate(np.asarray(prompts).tolist(), max_new_tokens=new_tokens, stop_ids=[], batch_size=batch,
                          **SETTINGS)
        assert all(len(t) == new_tokens for t in out)

    compile_s, ours_s, theirs_s = alternate(ours, lambda: _hf_generate(hf, prompts, new_tokens), repeats)
    ours_tps, theirs_tps = batch * new_tokens / min(ours_s), batch * new_tokens / min(theirs_s)
    return dict(ours_tps=ours_tps, theirs_tps=theirs_tps, ratio=ours_tps / theirs_tps, compile_s=compile_s,
                ours_s=ours_s, theirs_s=theirs_s)


def lima_workload(lm, hf, prompts, budgets, slots: int, repeats: int) -> dict:
    """prompts [N, P] with their own new-token budgets: ours in `slots` slots, refilled as prompts
    finish, vs transformers in static batches of `slots`, each run to its longest budget. Useful
    tokens/s (each prompt's own budget) of each (best run), their ratio and our slot occupancy."""
    from lima_jax import decoding

    useful = sum(budgets)
    stats = []

    def ours():
        gen = decoding.generate(lm, np.asarray(prompts).tolist(), list(budgets), seed=list(range(len(budgets))),
                                stop_ids=[], batch_size=slots, **SETTINGS)
        assert [len(t) for t in gen.tokens] == list(budgets)
        stats.append(gen.stats)

    def theirs():
        for start, steps in zip(range(0, len(budgets), slots), static_batch_steps(budgets, slots)):
            _hf_generate(hf, prompts[start: start + slots], steps)

    compile_s, ours_s, theirs_s = alternate(ours, theirs, repeats)
    ours_tps, theirs_tps = useful / min(ours_s), useful / min(theirs_s)
    return dict(ours_tps=ours_tps, theirs_tps=theirs_tps, ratio=ours_tps / theirs_tps, occupancy=stats[-1].occupancy,
                budgets=list(budgets), compile_s=compile_s, ours_s=ours_s, theirs_s=theirs_s,
                paired=sorted(t / o for o, t in zip(ours_s, theirs_s)))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fmt(seconds) -> str:
    return "/".join(f"{s:.2f}" for s in seconds) + " s"


if __name__ == "__main__":
    main()
