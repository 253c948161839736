"""Every console script run the way users run it: the installed command, in a subprocess.

Each exits 0 on --help and on a small real job, and 2 on bad input with one line on stderr,
`<command>: error: ...`, leaving no partial output behind. The real jobs chain as the LIMA loop
does: lima-data build → lima-train → lima-decode on its model_dir.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_hf_model

BIN = os.path.dirname(sys.executable)  # the venv's scripts, where pip put ours
COMMANDS = ("lima-train", "lima-decode", "lima-chat", "lima-convert", "lima-aot", "lima-report", "lima-data")
# Lines the C++ runtimes under TensorFlow / XLA log by themselves (glog format), not ours.
_RUNTIME_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the 'tpu' extra) is not installed: no TPU compiler")


def run(command: str, *args, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.path.join(BIN, command)
    assert os.path.exists(path), f"{command} is not installed next to {sys.executable}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    return subprocess.run([path, *map(str, args)], env=env, cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_bad_input(proc: subprocess.CompletedProcess, command: str, *message: str) -> None:
    """Exit status 2 and one line of ours on stderr, naming what is wrong."""
    ours = [line for line in proc.stderr.splitlines() if line.strip() and not _RUNTIME_LOG.match(line)]
    assert proc.returncode == 2, f"{proc.args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert len(ours) == 1, f"{proc.args}: expected one line on stderr, got:\n" + "\n".join(ours)
    assert ours[0].startswith(f"{command}: error: "), ours[0]
    for part in message:
        assert part in ours[0], (part, ours[0])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command):
    out = assert_ok(run(command, "--help"))
    assert out.startswith("usage: " + command)


# ---- the real jobs, chained ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """(manual dir of demo JSONL, demo tokenizer), written in-process (lima-data build is the job)."""
    from data_pipeline import demo_data

    root = tmp_path_factory.mktemp("scripts")
    manual = str(root / "manual")
    demo_data.write_demo_data(manual)
    return root, manual, demo_data.train_demo_tokenizer(str(root / "tokenizer"))


@pytest.fixture(scope="module")
def data_dir(demo_files):
    root, manual, _ = demo_files
    out = root / "tfds"
    assert "built lima" in assert_ok(run("lima-data", "build", "--manual_dir", manual, "--data_dir", out))
    return out


def _train_args(data_dir, tokenizer, model_dir, *extra):
    return ("--gin_file", "runs/demo.gin", "--model_dir", model_dir, "--gin_bindings", f"DATA_DIR='{data_dir}'",
            "--gin_bindings", f"TOKENIZER='{tokenizer}'", "--gin_bindings", "NUM_EPOCHS=1", *extra)


@pytest.fixture(scope="module")
def model_dir(demo_files, data_dir):
    root, _, tokenizer = demo_files
    out = root / "run"
    printed = assert_ok(run("lima-train", *_train_args(data_dir, tokenizer, out)))
    (root / "train_stdout.txt").write_text(printed)
    return out


def test_lima_train_runs_then_says_a_finished_run_is_finished(demo_files, data_dir, model_dir):
    assert os.listdir(model_dir / "checkpoints")
    last = (model_dir.parent / "train_stdout.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("summary: "), last
    summary = json.loads(last[len("summary: "):])
    assert summary["steps"] == 5 and summary["examples"] == 36  # lima_1k of the demo: 36 single-turn, batch 8
    assert 0 < summary["real_tokens"] < summary["computed_tokens"] and summary["train_s"] > 0 < summary["compile_s"]
    again = assert_ok(run("lima-train", *_train_args(data_dir, demo_files[2], model_dir)))
    assert "already finished" in again


def test_lima_train_bad_input(demo_files, data_dir, tmp_path):
    tokenizer = demo_files[2]
    out = tmp_path / "run"
    assert_bad_input(run("lima-train", "--gin_file", "runs/nope.gin", "--model_dir", out), "lima-train",
                     "runs/nope.gin: no such gin file")
    assert_bad_input(run("lima-train", *_train_args(data_dir, tokenizer, out, "--gin_bindings", "recipe.epochs=3")),
                     "lima-train", "recipe.epochs")
    assert_bad_input(run("lima-train", *_train_args(data_dir, tokenizer, out, "--gin_bindings",
                                                    f"INIT_CHECKPOINT='{tmp_path / 'nowhere'}'")),
                     "lima-train", "INIT_CHECKPOINT", "nowhere")
    assert not out.exists()


def test_lima_train_missing_data_is_bad_input(demo_files, tmp_path):
    out = tmp_path / "run"
    assert_bad_input(run("lima-train", *_train_args(tmp_path / "nowhere", demo_files[2], out)), "lima-train",
                     "nowhere", "lima-data build")
    assert not out.exists()


def test_lima_train_unexpected_failure_exits_1(demo_files, data_dir, tmp_path):
    """A diverging run is no input error: status 1 and the traceback, no checkpoint of the bad weights."""
    out = tmp_path / "run"
    proc = run("lima-train", *_train_args(data_dir, demo_files[2], out, "--gin_bindings", "recipe.learning_rate=1e30",
                                          "--gin_bindings", "recipe.final_learning_rate=1e30"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "FloatingPointError: loss is " in proc.stderr
    assert not os.listdir(out / "checkpoints")


def test_lima_decode_two_prompts(demo_files, model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "conversations": ["How do I boil an egg?"]}\n'
                       '{"id": "b", "conversations": ["Name a colour."]}\n')
    out = tmp_path / "out.jsonl"
    printed = assert_ok(run("lima-decode", "--checkpoint", model_dir, "--tokenizer", demo_files[2], "--prompts", prompts,
                            "--output", out, "--max_new_tokens", 8, "--no_progress"))
    assert "2 responses" in printed
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b"]


def test_lima_decode_bad_input(demo_files, model_dir, tmp_path):
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text('{"conversations": ["hi"]}\n{"conversations": ["hi", "there"]}\n')
    good.write_text('{"conversations": ["hi"]}\n')
    out = tmp_path / "out.jsonl"
    common = ("--tokenizer", demo_files[2], "--output", out)
    assert_bad_input(run("lima-decode", "--checkpoint", model_dir, "--prompts", bad, *common), "lima-decode",
                     f"{bad}:2:", "odd number of turns")
    assert_bad_input(run("lima-decode", "--checkpoint", tmp_path / "missing", "--prompts", good, *common),
                     "lima-decode", "missing")
    assert not out.exists()


def test_lima_chat_answers_from_stdin(demo_files, model_dir):
    out = assert_ok(run("lima-chat", "--checkpoint", model_dir, "--tokenizer", demo_files[2], "--max_new_tokens", 4,
                        stdin="Hello there\n/quit\n"))
    assert "LIMA chat" in out


def test_lima_chat_bad_input(demo_files, model_dir, tmp_path):
    assert_bad_input(run("lima-chat", "--checkpoint", tmp_path / "missing", "--tokenizer", demo_files[2]),
                     "lima-chat", "missing")
    assert_bad_input(run("lima-chat", "--checkpoint", model_dir, "--tokenizer", demo_files[2],
                         "--gin_bindings", "decode.top_q=0.5"), "lima-chat", "top_q")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    make_hf_model().save_pretrained(str(folder))
    return folder


def test_lima_convert_hf_to_orbax(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert_ok(run("lima-convert", "hf-to-orbax", hf_dir, out))
    assert (out / "lima_config.json").exists() and (out / "params").is_dir()


def test_lima_convert_bad_input(hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_bad_input(run("lima-convert", "hf-to-orbax", tmp_path / "missing", out), "lima-convert", "missing")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    assert_bad_input(run("lima-convert", "orbax-to-hf", not_a_checkpoint, out), "lima-convert", str(not_a_checkpoint))
    assert not out.exists()


def test_lima_data_bad_input(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text('{"conversations": ["Q", "A"], "source": "authors"}\n{"conversations": ["Q"\n')
    assert_bad_input(run("lima-data", "build", "--manual_dir", manual, "--data_dir", tmp_path / "data"), "lima-data",
                     f"{manual / 'train.jsonl'}:2:", "not JSON")
    assert not (tmp_path / "data").exists()
    out = tmp_path / "pairs.jsonl"
    assert_bad_input(run("lima-data", "curate", "natinst", "--tasks", tmp_path / "missing", "--out", out),
                     "lima-data", "missing")
    assert not out.exists()


def _likert(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lima_report_likert(tmp_path):
    scores = _likert(tmp_path / "scores.jsonl", [{"prompt_id": i, "score": 3 + i % 3} for i in range(6)])
    assert_ok(run("lima-report", "likert", scores, "--json", tmp_path / "r.json", "--n_bootstrap", 20))
    assert json.loads((tmp_path / "r.json").read_text())


def test_lima_report_bad_input(tmp_path):
    out = tmp_path / "r.json"
    bad = _likert(tmp_path / "bad.jsonl", [{"prompt_id": 1, "score": 4}, {"prompt_id": 2, "score": 9}])
    assert_bad_input(run("lima-report", "likert", bad, "--json", out), "lima-report", f"{bad}:2:", "outside 1-6")
    assert_bad_input(run("lima-report", "likert", tmp_path / "missing.jsonl", "--json", out), "lima-report",
                     "missing.jsonl")
    assert not out.exists()


@needs_libtpu
def test_lima_aot_one_tiny_compile(tmp_path):
    out = tmp_path / "report.json"
    assert_ok(run("lima-aot", "--model", "tiny", "--topology", "v4-8", "--batch_size", 8, "--seq_len", 64,
                  "--json", out))
    report = json.loads(out.read_text())
    assert report["fits"] is True and report["packing"] is True and report["rows"] == 8
    out.unlink()
    assert_bad_input(run("lima-aot", "--model", "tiny", "--topology", "v4-8", "--batch_size", 8, "--seq_len", 64,
                         "--rows", 3, "--json", out), "lima-aot", "--rows 3")
    assert not out.exists()


def test_lima_aot_bad_input(tmp_path):
    out = tmp_path / "report.json"
    assert_bad_input(run("lima-aot", "--topology", "v9-8", "--json", out), "lima-aot", "v9-8")
    assert_bad_input(run("lima-aot", "--model", "llama_1b", "--topology", "v4-8", "--json", out), "lima-aot",
                     "llama_1b")
    assert_bad_input(run("lima-aot", "--model", "tiny", "--topology", "v4-8", "--mesh", "fsdp=3", "--json", out),
                     "lima-aot", "fsdp=3")
    assert not out.exists()
