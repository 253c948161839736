"""data_pipeline/cli.py (`lima-data`), called in-process: one-line errors with status 2, and each command."""
from __future__ import annotations

import json
import os

import lima_jax
from data_pipeline import demo_data
from data_pipeline.cli import main
from lima_jax.tokenizer import Tokenizer
from tests.lima_data_helpers import demo_build  # noqa: F401  (session fixture)


def test_build_error_is_one_line_with_status_2(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text('{"conversations": ["Q", "A"], "source": "authors"}\n'
                                        '{"conversations": ["Q", "A"], "source": "forum"}\n')
    assert main(["build", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lima-data: error: {manual / 'train.jsonl'}:2: unknown source 'forum'; expected one of " \
                  "stackexchange, authors, wikihow, nlp, writingprompts, multi_turn"
    assert not (tmp_path / "data").exists()


def test_build_skip_invalid_reports(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text('{"conversations": ["Q", "A"], "source": "authors"}\nnot json\n')
    assert main(["build", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data"), "--skip_invalid"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {manual / 'train.jsonl'}:2: not JSON" in out and "train 1; skipped 1" in out


def test_demo_writes_data_and_a_tokenizer_that_fits_the_tiny_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no_build"]) == 0
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        assert os.path.exists(tmp_path / "manual" / name)
    tok = Tokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.eot_id == demo_data.DEMO_VOCAB_SIZE == 500
    assert (tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (1, 2, 0, -1)
    assert tok.vocab_size <= lima_jax.preset("tiny").vocab_size
    rows = [json.loads(line) for line in open(tmp_path / "manual" / "train.jsonl")]
    assert len(rows) == 40 and sum(r["source"] == "multi_turn" for r in rows) == 4
    assert len(open(tmp_path / "manual" / "test.jsonl").readlines()) == 5
    assert "EOT id 500" in capsys.readouterr().out
    text = "Why does ice float on water?"
    assert tok.decode(tok.encode(text)) == text


def test_export_and_stats(demo_build, tmp_path, capsys):
    data_dir, tok, _ = demo_build
    out = tmp_path / "epoch.jsonl"
    assert main(["export", "--data_dir", data_dir, "--tokenizer", tok, "--mixture", "lima_1k_dialogue",
                 "--max_len", "300", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 40 and all(len(e["input_ids"]) <= 300 for e in lines)
    assert all(len(e["input_ids"]) == len(e["loss_mask"]) and e["input_ids"][0] == 1 for e in lines)
    png, js = tmp_path / "lengths.png", tmp_path / "stats.json"
    assert main(["stats", "--data_dir", data_dir, "--tokenizer", tok, "--mixture", "lima_1k_dialogue",
                 "--max_len", "300", "--png", str(png), "--json", str(js), "--packing", "--batch_size", "8"]) == 0
    printed = capsys.readouterr().out
    stats = json.load(open(js))
    assert stats["per_source"] == {"authors": 8, "multi_turn": 4, "nlp": 8, "stackexchange": 8, "wikihow": 8,
                                   "writingprompts": 4}
    full = [e for e in lines if len(e["input_ids"]) == 300]
    assert stats["percent_truncated"] > 0 and len(full) >= round(stats["percent_truncated"] * 40 / 100)
    assert set(stats["length_percentiles"]) == {"p50", "p90", "p95", "p99"}
    assert "truncated at 300" in printed and "computed/real tokens at batch 8: padded" in printed
    ratio = stats["packing"]["computed_per_real"]
    assert 1.0 <= ratio["packed"] < ratio["padded"], ratio
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_curate_commands_write_jsonl_and_report_drops(tmp_path, capsys):
    src, tgt = tmp_path / "t.wp_source", tmp_path / "t.wp_target"
    src.write_text("[ WP ] A prompt .\n[ OT ] Off topic .\n")
    tgt.write_text("A story . " * 80 + "\nAnother story .\n")
    out = tmp_path / "wp.jsonl"
    assert main(["curate", "writingprompts", "--source", str(src), "--target", str(tgt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped by not_wp: 1" in printed and "wrote 1 pairs" in printed
    [row] = [json.loads(line) for line in open(out)]
    assert row["source"] == "writingprompts" and row["conversations"][0] == "A prompt."
    assert main(["curate", "natinst", "--tasks", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("lima-data: error: ")
