"""data_pipeline/lima_dataset.py: validation with FILE:LINE errors, atomic TFDS build."""
from __future__ import annotations

import json
import os

import pytest

from data_pipeline import lima_dataset
from data_pipeline.lima_dataset import InvalidLimaLine
from tests.lima_data_helpers import demo_build  # noqa: F401  (session fixture)

GOOD = json.dumps({"conversations": ["Q?", "A."], "source": "authors"})
PROMPT = json.dumps({"conversations": ["Q?"]})

# (file, its lines, the bad line number, words the message must contain)
INVALID = {
    "not_json": ("train.jsonl", [GOOD, '{"conversations": ["Q", "A"], "source": "authors"'], 2, "not JSON"),
    "missing": ("train.jsonl", [json.dumps({"source": "authors"})], 1, 'missing "conversations"'),
    "empty_list": ("train.jsonl", [GOOD, GOOD, json.dumps({"conversations": [], "source": "nlp"})], 3,
                   'empty "conversations"'),
    "non_string": ("train.jsonl", [json.dumps({"conversations": ["Q", 7], "source": "nlp"})], 1,
                   "turn 1 is not a string"),
    "empty_turn": ("train.jsonl", [json.dumps({"conversations": ["Q", "  "], "source": "nlp"})], 1,
                   "turn 1 is empty"),
    "even_prompt": ("dev.jsonl", [PROMPT, json.dumps({"conversations": ["Q", "A"]})], 2, "odd number of turns"),
    "unknown_source": ("train.jsonl", [GOOD, json.dumps({"conversations": ["Q", "A"], "source": "reddit"})], 2,
                       "unknown source 'reddit'"),
}


def write_manual(folder, files: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, lines in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(folder)


def tree(folder) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_line_names_file_and_line_and_leaves_data_dir_untouched(tmp_path, case):
    filename, lines, lineno, words = INVALID[case]
    files = {"train.jsonl": [GOOD], filename: lines}
    manual = write_manual(tmp_path / "manual", files)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keep.txt").write_text("existing")
    before = tree(data_dir)
    with pytest.raises(InvalidLimaLine) as err:
        lima_dataset.build(manual, str(data_dir))
    path = os.path.join(manual, filename)
    assert str(err.value).startswith(f"{path}:{lineno}: ")
    assert words in str(err.value)
    assert "\n" not in str(err.value)
    assert tree(data_dir) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lima-build")]


def test_skip_invalid_reports_and_builds_the_rest(tmp_path):
    bad = json.dumps({"conversations": ["Q", 7], "source": "nlp"})
    manual = write_manual(tmp_path / "manual", {"train.jsonl": [GOOD, bad, GOOD, "", "oops"]})
    info = lima_dataset.build(manual, str(tmp_path / "data"), skip_invalid=True)
    assert info["splits"] == {"train": 2}
    assert len(info["skipped"]) == 2
    assert info["skipped"][0].endswith(":2: turn 1 is not a string (int)")
    assert ":5: not JSON" in info["skipped"][1]
    rows = lima_dataset.load_split(str(tmp_path / "data"), "train")
    assert sorted(r["index"] for r in rows) == [1, 3]


def test_missing_train_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        lima_dataset.build(str(tmp_path), str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_demo_build_has_all_splits_and_sources(demo_build):
    data_dir, _, manual = demo_build
    assert set(lima_dataset.available_splits(data_dir)) == {"train", "validation", "test"}
    train = lima_dataset.load_split(data_dir, "train")
    with open(os.path.join(manual, "train.jsonl")) as f:
        expected = [json.loads(line) for line in f]
    by_line = {r["index"]: r for r in train}
    assert len(train) == len(expected)
    for lineno, row in enumerate(expected, start=1):
        assert by_line[lineno]["conversations"] == row["conversations"]
        assert by_line[lineno]["source"] == row["source"]
    assert {r["source"] for r in train} == set(lima_dataset.SOURCES)
    test = lima_dataset.load_split(data_dir, "test")
    assert all(len(r["conversations"]) == 1 and r["source"] == "" for r in test)


def test_rebuild_replaces_the_previous_version(tmp_path):
    data_dir = str(tmp_path / "data")
    lima_dataset.build(write_manual(tmp_path / "m1", {"train.jsonl": [GOOD]}), data_dir)
    lima_dataset.build(write_manual(tmp_path / "m2", {"train.jsonl": [GOOD, GOOD, GOOD]}), data_dir)
    assert len(lima_dataset.load_split(data_dir, "train")) == 3
    assert os.listdir(os.path.join(data_dir, "lima")) == [lima_dataset.DATA_VERSION]
