"""lima-decode: responses for a file of LIMA-format prompts, resumable, one JSON line per prompt.

Input lines: {"id"?: str|int, "conversations": [user, (assistant, user)...]} (id defaults to the
line number). Output lines: {"id", "prompt" (the last user turn), "conversations", "response",
"num_tokens", "finish_reason" ("stop" | "length"), "settings"}.

Resuming: batches are fixed by the whole prompt file (sorted by length, then cut), each batch is
appended as complete lines with one write + fsync, and a rerun drops a trailing partial line and
skips the ids already written. Each batch samples with a seed derived from its index, so a run that
was killed and rerun writes the same file as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterator, Optional, Sequence

import gin

from lima_jax import decoding
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


def length_batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Batches of prompts of similar token length (less padding), in a fixed order."""
    ordered = sorted(prompts, key=lambda p: (len(p.tokens), p.line))
    return [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]


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
    for p in prompts:
        p.tokens = encode_prompt(p.turns, tokenizer)
    done = read_done_ids(output_path)
    batch_size = int(settings["batch_size"])
    batches = length_batches(prompts, batch_size)
    todo = sum(p.id not in done for p in prompts)
    stop_ids = stop_ids_for(lm, tokenizer)
    record = {k: settings[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
                                       "seed", "greedy")}
    record["checkpoint"] = checkpoint
    written = 0
    with _progress(todo, progress, os.path.basename(output_path)) as bar:
        for index, batch in enumerate(batches):
            if all(p.id in done for p in batch):
                continue
            # Full batches only (the last one padded with copies of its first prompt): one compiled shape.
            rows = [p.tokens for p in batch] + [batch[0].tokens] * (batch_size - len(batch))
            gen = decoding.generate(lm, rows, settings["max_new_tokens"], greedy=settings["greedy"],
                                    temperature=settings["temperature"], top_p=settings["top_p"],
                                    top_k=settings["top_k"], repetition_penalty=settings["repetition_penalty"],
                                    seed=_batch_seed(settings["seed"], index), stop_ids=stop_ids)
            out = []
            for p, tokens, stopped in zip(batch, gen.tokens, gen.stopped):
                if p.id in done:
                    continue
                out.append(dict(id=p.id, prompt=p.turns[-1], conversations=p.turns, response=tokenizer.decode(tokens),
                                num_tokens=len(tokens), finish_reason="stop" if stopped else "length",
                                settings=record))
            append_lines(output_path, out)
            written += len(out)
            bar.update(len(out))
    return written


def _batch_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + index) % (2 ** 31)


class _progress:
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
