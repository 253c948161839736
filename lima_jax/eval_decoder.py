"""lima-decode: responses for a file of LIMA-format prompts, resumable, one JSON line per prompt.

Input lines: {"id"?: str|int, "conversations": [user, (assistant, user)...]} (id defaults to the
line number). Output lines: {"id", "prompt" (the last user turn), "conversations", "response",
"num_tokens", "finish_reason" ("stop" | "length"), "settings"}.

Decoding runs `batch_size` slots (decoding.generate): each prompt's line is appended (one write +
fsync) as soon as it finishes, and its slot takes the next prompt. Each prompt samples from its own
seed, derived from the run's seed and its id, so its line does not depend on which prompts run
beside it. Resuming: a kill loses only the prompts in flight; a rerun drops a trailing partial line,
skips the ids already written and redoes the others, giving the same lines. Once every prompt is
done the file is rewritten (atomically) in prompt-file order, so a killed and rerun job ends with
the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from typing import Callable, Iterator, Optional, Sequence

import gin

from lima_jax import decoding
from lima_jax.atomic import atomic_write_text
from lima_jax.chat_format import encode_prompt, parse_lima_line
from lima_jax.tokenizer import Tokenizer, find_tokenizer

DEFAULT_GIN = "runs/lima_decode.gin"


@gin.configurable("decode")
def decode_settings(temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.2,
                    max_new_tokens: int = 2048, batch_size: int = 8, seed: int = 0, greedy: bool = False) -> dict:
    """The paper's decoding settings (§4.1); gin/runs/lima_decode.gin binds them, flags override."""
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, greedy=greedy)


@dataclasses.dataclass
class Prompt:
    id: object
    turns: list
    line: int
    tokens: list = dataclasses.field(default_factory=list)


def read_prompts(path: str) -> list[Prompt]:
    """Prompts of a LIMA-format JSONL file; a bad line raises `FILE:LINE: what is wrong`."""
    prompts, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            turns = parse_lima_line(line, path, line_no, prompts_only=True)["conversations"]
            row = json.loads(line)
            pid = row.get("id", line_no)
            if not isinstance(pid, (str, int)) or isinstance(pid, bool):
                raise ValueError(f'{where}: "id" must be a string or an integer')
            if pid in seen:
                raise ValueError(f"{where}: id {pid!r} already used on line {seen[pid]}")
            seen[pid] = line_no
            prompts.append(Prompt(pid, turns, line_no))
    return prompts


def read_done_ids(path: str) -> set:
    """Ids already in an output file. A trailing partial line (a write cut short) is removed."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
            f.flush()
            os.fsync(f.fileno())
    done = set()
    for line_no, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_no}: not an output line of lima-decode") from None
    return done


def append_lines(path: str, rows: Sequence[dict]) -> None:
    """Appends complete JSON lines with a single write, flushed to disk before returning."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def prompt_seed(seed: int, prompt_id) -> int:
    """A prompt's own sampling seed: the run's seed and the prompt's id, hashed (stable across runs)."""
    return zlib.crc32(json.dumps([int(seed), prompt_id]).encode("utf-8")) & 0x7FFFFFFF


def sort_output(path: str, prompts: Sequence[Prompt]) -> None:
    """Rewrites a complete output file with its lines in prompt-file order (lines of other ids last,
    in their order), atomically; nothing is written when the order is already right."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines(keepends=True) if line.strip()]
    rank = {p.id: i for i, p in enumerate(prompts)}
    ordered = sorted(lines, key=lambda line: rank.get(json.loads(line)["id"], len(rank)))
    if ordered != lines:
        atomic_write_text(path, "".join(ordered))


def stop_ids_for(lm, tokenizer: Tokenizer) -> list[int]:
    """EOT and EOS of the tokenizer and of the model config, within the model's vocabulary."""
    ids = set(decoding.default_stop_ids(lm.config)) | {tokenizer.eot_id, tokenizer.eos_id}
    return sorted(i for i in ids if 0 <= i < lm.config.vocab_size)


def decode_file(lm, tokenizer: Tokenizer, prompts_path: str, output_path: str, settings: dict,
                checkpoint: str = "", progress: bool = True) -> int:
    """Decodes every prompt of prompts_path not yet in output_path; returns how many were written."""
    if tokenizer.eot_id >= lm.config.vocab_size:
        raise ValueError(f"the model's vocabulary ({lm.config.vocab_size}) lacks the EOT id {tokenizer.eot_id} of "
                         f"{tokenizer.path}: convert the checkpoint with --add_eot or use its own tokenizer")
    prompts = read_prompts(prompts_path)
    context = lm.config.max_position_embeddings
    for p in prompts:
        p.tokens = encode_prompt(p.turns, tokenizer)
        if len(p.tokens) >= context:
            raise ValueError(f"{prompts_path}:{p.line}: the prompt is {len(p.tokens)} tokens; the model's context "
                             f"holds {context} (prompt plus at least one new token)")
    done = read_done_ids(output_path)
    todo = [p for p in prompts if p.id not in done]
    record = {k: settings[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
                                       "seed", "greedy")}
    record["checkpoint"] = checkpoint
    with _progress(len(todo), progress, os.path.basename(output_path)) as bar:
        def finished(i, tokens, stopped):
            p = todo[i]
            append_lines(output_path, [dict(id=p.id, prompt=p.turns[-1], conversations=p.turns,
                                            response=tokenizer.decode(tokens), num_tokens=len(tokens),
                                            finish_reason="stop" if stopped else "length", settings=record)])
            bar.update(1)

        decoding.generate(lm, [p.tokens for p in todo], settings["max_new_tokens"], greedy=settings["greedy"],
                          temperature=settings["temperature"], top_p=settings["top_p"], top_k=settings["top_k"],
                          repetition_penalty=settings["repetition_penalty"],
                          seed=[prompt_seed(settings["seed"], p.id) for p in todo],
                          stop_ids=stop_ids_for(lm, tokenizer),
                          batch_size=int(settings["batch_size"]), on_finish=finished, on_chunk=bar.show_speed)
    if os.path.exists(output_path):
        sort_output(output_path, prompts)
    return len(todo)


class _progress:
    """A tqdm bar over prompts showing the decoder's tokens/s and slot occupancy (or nothing)."""

    def __init__(self, total: int, enabled: bool, name: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="prompt")

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show_speed(self, stats: decoding.DecodeStats) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{stats.tokens_per_s:.1f} tok/s, occupancy {stats.occupancy:.0%}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# ---- checkpoint sweep (§3: pick the epoch by dev-set responses) -------------------------------------
def parse_epochs(spec: str) -> list[int]:
    """'5-10' → [5, ..., 10]; '2,4,6' → [2, 4, 6]."""
    epochs = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--sweep_checkpoints: {spec!r} is not a range like 5-10 or a list like 5,7,9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--sweep_checkpoints: empty range {part.strip()!r}")
        epochs.extend(range(lo, hi + 1))
    return sorted(set(epochs))


def epoch_output_path(output: str, epoch: int) -> str:
    """out.jsonl → out.epoch5.jsonl."""
    root, ext = os.path.splitext(output)
    return f"{root}.epoch{epoch}{ext or '.jsonl'}"


def epoch_models(model_dir: str, epochs: Sequence[int], dtype: str = "float32", mesh=None) -> Iterator[tuple]:
    """(epoch, step, LanguageModel) for each requested end-of-epoch checkpoint of a training model_dir,
    one model in memory at a time."""
    from lima_jax import model_dir as model_dir_lib
    from lima_jax.language_model import LanguageModel, build_model

    steps = model_dir_lib.epoch_steps(model_dir)
    missing = [e for e in epochs if e not in steps]
    if missing:
        raise ValueError(f"{model_dir}: no end-of-epoch checkpoint for epoch(s) {missing}; "
                         f"epochs present: {sorted(steps)}")
    for epoch in epochs:
        config, params = model_dir_lib.restore_params(model_dir, steps[epoch])
        config = config.replace(dtype=dtype, param_dtype=dtype, residual_dropout=0.0)
        yield epoch, steps[epoch], LanguageModel(config, build_model(config, params, mesh), mesh)


def sweep(model_dir: str, tokenizer: Tokenizer, prompts_path: str, output: str, settings: dict, epochs: Sequence[int],
          dtype: str = "float32", progress: bool = True,
          models: Optional[Callable[..., Iterator[tuple]]] = None) -> dict[int, str]:
    """Decodes the prompts with each epoch's checkpoint into output with the epoch in its name."""
    outputs = {}
    for epoch, step, lm in (models or epoch_models)(model_dir, epochs, dtype):
        path = epoch_output_path(output, epoch)
        decode_file(lm, tokenizer, prompts_path, path, settings, checkpoint=f"{model_dir}@step{step}",
                    progress=progress)
        outputs[epoch] = path
    return outputs


def resolve_tokenizer(checkpoint: str, tokenizer: Optional[str]) -> Tokenizer:
    path = tokenizer or find_tokenizer(checkpoint)
    if path is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.model next to the checkpoint; pass --tokenizer")
    return Tokenizer(path)


def load_settings(gin_files: Sequence[str], gin_bindings: Sequence[str], overrides: dict) -> dict:
    """decode_settings() after parsing gin (default: gin/runs/lima_decode.gin), then flags that were given."""
    from lima_jax import gin_config

    gin_config.parse(list(gin_files) or [DEFAULT_GIN], list(gin_bindings))
    settings = decode_settings()
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
