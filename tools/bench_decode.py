"""Decoding speed: our compiled loop vs transformers' `generate`, same model, settings and CPU.

    JAX_PLATFORMS=cpu python tools/bench_decode.py [--batch_sizes 1 8] [--repeats 3]

A random 58M LLaMA (hidden 512, 8 layers, 8 heads, FFN 1376, vocab 32000) is built in transformers,
saved, and loaded with lima_jax.load_pretrained. Both sample with the paper's settings (top-p 0.9,
temperature 0.7, repetition penalty 1.2) from 64-token prompts for exactly 128 new tokens (no stop).
Our compile time is measured apart and excluded from our tokens/s; each figure is the best of
`--repeats` timed runs, the two implementations alternating so background load hits both alike.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

SETTINGS = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lima_jax
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        lm = lima_jax.load_pretrained(folder)
    print(f"model: {lm.config.num_params() / 1e6:.1f}M parameters; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")

    rng = np.random.RandomState(0)
    n = args.new_tokens
    for batch in args.batch_sizes:
        prompts = rng.randint(3, CONFIG["vocab_size"], (batch, args.prompt_len))

        def ours():
            out = lm.generate(prompts.tolist(), max_new_tokens=n, stop_ids=[], **SETTINGS)
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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fmt(seconds) -> str:
    return "/".join(f"{s:.2f}" for s in seconds) + " s"


if __name__ == "__main__":
    main()
