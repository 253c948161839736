"""lima_jax/eval_decoder.py and lima-decode: prompt validation, output lines, resume after kill -9,
gin defaults, the checkpoint sweep."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lima_jax import eval_decoder
from lima_jax.cli import decode as decode_cli
from tests.conftest import ROOT, make_hf_model

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "how do birds fly so high",
             "tell me a story about the sea", "what is the capital of france", "write a poem about rain",
             "why is the sky blue", "please explain gravity to a child"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny HF folder whose vocabulary includes the EOT id of a tiny sentencepiece model stored with it."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("ckpt")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_prefix=str(folder / "sp"),
                                   vocab_size=48, model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    model = make_hf_model(seed=1, vocab_size=64, max_position_embeddings=96)
    model.save_pretrained(str(folder))
    shutil.move(str(folder / "sp.model"), str(folder / "tokenizer.model"))
    return str(folder)


def _write_prompts(path, n=10):
    with open(path, "w") as f:
        for i in range(n):
            row = {"conversations": [SENTENCES[i % len(SENTENCES)] + " " * (i % 3)]}
            if i % 4 == 1:
                row = {"id": f"multi-{i}", "conversations": [SENTENCES[i % 8], SENTENCES[(i + 1) % 8], "and then"]}
            f.write(json.dumps(row) + "\n")


def _args(ckpt, prompts, out, *extra):
    return ["--checkpoint", ckpt, "--prompts", str(prompts), "--output", str(out), "--batch_size", "2",
            "--max_new_tokens", "40", "--no_progress", *extra]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_decode_writes_one_line_per_prompt(checkpoint, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 5)
    assert decode_cli.main(_args(checkpoint, prompts, out)) == 0
    rows = _rows(out)
    assert sorted(str(r["id"]) for r in rows) == sorted(["1", "multi-1", "3", "4", "5"])
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["response"], str)
        assert (r["finish_reason"] == "length") == (r["num_tokens"] == 40)
        assert r["settings"]["top_p"] == 0.9 and r["settings"]["temperature"] == 0.7
        assert r["settings"]["repetition_penalty"] == 1.2 and r["prompt"] == r["conversations"][-1]
    # A second run finds every id done and writes nothing.
    assert decode_cli.main(_args(checkpoint, prompts, out)) == 0
    assert len(_rows(out)) == 5


def test_killed_run_resumes_to_the_same_file(checkpoint, tmp_path):
    prompts = tmp_path / "in.jsonl"
    _write_prompts(prompts, 20)
    reference = tmp_path / "ref.jsonl"
    assert decode_cli.main(_args(checkpoint, prompts, reference)) == 0

    out = tmp_path / "out.jsonl"
    code = f"import sys; from lima_jax.cli.decode import main; sys.exit(main({_args(checkpoint, prompts, out)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(out) and os.path.getsize(out) > 0:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the decoder finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    at_kill = open(out).read().splitlines(keepends=True)
    assert 0 < len(at_kill) < 20
    # Lines are final as soon as they are written: each equals the uninterrupted run's line.
    assert set(at_kill) < set(open(reference).read().splitlines(keepends=True))
    with open(out, "a") as f:  # a write cut short mid-line
        f.write('{"id": "half a line')
    assert decode_cli.main(_args(checkpoint, prompts, out)) == 0
    assert open(out).read() == open(reference).read()
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == 20
    assert ids == _line_ids(prompts)


def _line_ids(path):
    """The ids of a prompt file, in its order (an id defaults to the line number)."""
    return [json.loads(line).get("id", n) for n, line in enumerate(open(path), start=1)]


def test_lines_stream_in_finish_order_then_the_file_is_in_prompt_order(checkpoint, tmp_path, monkeypatch):
    """Each prompt's line is appended when it finishes (short answers first, whatever their place in
    the file); the finished file is rewritten in prompt order. A prompt's line does not depend on the
    prompts decoded beside it: alone in its own file it is the same line."""
    from lima_jax import load_pretrained

    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 6)
    appended = []
    real = eval_decoder.append_lines
    monkeypatch.setattr(eval_decoder, "append_lines", lambda path, rows: appended.append(rows) or real(path, rows))
    lm, tokenizer = load_pretrained(checkpoint), eval_decoder.resolve_tokenizer(checkpoint, None)
    # Budgets up to the context: a long (multi-turn) prompt has less room, and a later slot.
    settings = dict(eval_decoder.load_settings([], [], {}), batch_size=2)
    assert eval_decoder.decode_file(lm, tokenizer, str(prompts), str(out), settings, progress=False) == 6
    assert [len(rows) for rows in appended] == [1] * 6  # one line per write, as each prompt finished
    streamed = [rows[0]["id"] for rows in appended]
    assert sorted(map(str, streamed)) == sorted(map(str, _line_ids(prompts))) and streamed != _line_ids(prompts)
    assert [r["id"] for r in _rows(out)] == _line_ids(prompts)
    row = json.loads(open(prompts).read().splitlines()[2])
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps(dict(row, id=3)) + "\n")  # the same id as line 3 of the full file
    eval_decoder.decode_file(lm, tokenizer, str(alone), str(tmp_path / "alone_out.jsonl"), settings, progress=False)
    assert open(tmp_path / "alone_out.jsonl").read() == open(out).read().splitlines(keepends=True)[2]


def test_progress_bar_shows_speed_and_occupancy(checkpoint, tmp_path, capsys):
    from lima_jax import load_pretrained

    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 3)
    settings = dict(eval_decoder.load_settings([], [], {}), batch_size=2, max_new_tokens=40)
    lm, tokenizer = load_pretrained(checkpoint), eval_decoder.resolve_tokenizer(checkpoint, None)
    assert eval_decoder.decode_file(lm, tokenizer, str(prompts), str(out), settings, progress=True) == 3
    err = capsys.readouterr().err
    assert "3/3" in err and re.search(r"[\d.]+ tok/s, occupancy \d+%", err), err


def test_prompt_longer_than_the_context_is_a_file_line_error(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text('{"conversations": ["hi"]}\n{"conversations": ["' + "the cat sat on the mat " * 30 + '"]}\n')
    assert decode_cli.main(_args(checkpoint, prompts, tmp_path / "out.jsonl")) == 2
    assert re.search(rf"{prompts}:2: the prompt is \d+ tokens; the model's context holds 96", capsys.readouterr().err)
    assert not (tmp_path / "out.jsonl").exists()


def test_malformed_prompt_line_is_a_file_line_error(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"conversations": ["hi"]}\n\n{"conversations": ["a", "b"]}\n')
    assert decode_cli.main(_args(checkpoint, prompts, tmp_path / "out.jsonl")) == 2
    assert f"{prompts}:3: a prompt needs an odd number of turns" in capsys.readouterr().err
    for text, what in [('{"conversations": ["hi"]\n', "not JSON"), ("[1]\n", "expected a JSON object"),
                       ('{"conversations": []}\n', 'empty "conversations"'), ('{"conversations": [" "]}\n', "empty"),
                       ('{"id": 1, "conversations": ["x"]}\n{"id": 1, "conversations": ["y"]}\n', "already used")]:
        prompts.write_text(text)
        with pytest.raises(ValueError, match=f"^{prompts}:[12]: .*{what}"):
            eval_decoder.read_prompts(str(prompts))


def test_settings_come_from_gin_and_flags():
    assert eval_decoder.load_settings([], [], {}) == dict(temperature=0.7, top_p=0.9, top_k=0,
                                                          repetition_penalty=1.2, max_new_tokens=2048,
                                                          batch_size=8, seed=0, greedy=False)
    import gin

    try:
        s = eval_decoder.load_settings([], ["decode.top_p = 0.5"], {"temperature": 1.0, "top_k": None})
        assert s["top_p"] == 0.5 and s["temperature"] == 1.0 and s["top_k"] == 0
    finally:
        gin.clear_config()  # gin is global: leave no binding for the other tests


def test_sweep_writes_one_file_per_epoch(checkpoint, tmp_path):
    from lima_jax import load_pretrained

    lm = load_pretrained(checkpoint)
    tokenizer = eval_decoder.resolve_tokenizer(checkpoint, None)

    def fake_models(model_dir, epochs, dtype):  # stands in for train.py's end-of-epoch checkpoints
        for epoch in epochs:
            yield epoch, epoch * 10, lm

    prompts = tmp_path / "dev.jsonl"
    _write_prompts(prompts, 3)
    settings = dict(eval_decoder.load_settings([], [], {}), batch_size=2, max_new_tokens=8)
    assert eval_decoder.parse_epochs("5-7") == [5, 6, 7] and eval_decoder.parse_epochs("2,4") == [2, 4]
    outputs = eval_decoder.sweep("run", tokenizer, str(prompts), str(tmp_path / "dev_out.jsonl"), settings,
                                 [5, 6], progress=False, models=fake_models)
    assert outputs == {5: str(tmp_path / "dev_out.epoch5.jsonl"), 6: str(tmp_path / "dev_out.epoch6.jsonl")}
    for epoch, path in outputs.items():
        rows = _rows(path)
        assert len(rows) == 3 and all(r["settings"]["checkpoint"] == f"run@step{epoch * 10}" for r in rows)
    with pytest.raises(ValueError, match="not a range"):
        eval_decoder.parse_epochs("five")
