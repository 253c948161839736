"""The TFDS builder `lima`: LIMA-format JSONL from a manual dir, validated line by line.

Manual dir: `train.jsonl` (lines `{"conversations": [user, assistant, ...], "source": ...}`), optional
`dev.jsonl` / `test.jsonl` (prompts: an odd number of turns, ending with the user's). Splits:
train, validation (dev.jsonl), test. Every example keeps its line number as `index`, so subsets drawn
by seed (ablations) and exports can name the line they came from.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from lima_jax.chat_format import SOURCES, InvalidLimaLine, parse_lima_line as parse_line  # noqa: F401

# file in the manual dir -> (TFDS split, prompts only?)
SPLIT_FILES = {"train.jsonl": ("train", False), "dev.jsonl": ("validation", True), "test.jsonl": ("test", True)}
NAME = "lima"
DATA_VERSION = "1.0.0"


@dataclass
class ReadResult:
    examples: list
    skipped: list = field(default_factory=list)  # InvalidLimaLine of each skipped line


def read_lima_jsonl(path: str, prompts_only: bool, skip_invalid: bool = False) -> ReadResult:
    """All examples of one file; the first bad line raises unless `skip_invalid`."""
    result = ReadResult([])
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue  # a trailing blank line is not an example
            try:
                result.examples.append(parse_line(text, path, lineno, prompts_only))
            except InvalidLimaLine as e:
                if not skip_invalid:
                    raise
                result.skipped.append(e)
    return result


def read_manual_dir(manual_dir: str, skip_invalid: bool = False) -> dict[str, ReadResult]:
    """{split: ReadResult} for the files present; train.jsonl is required."""
    if not os.path.exists(os.path.join(manual_dir, "train.jsonl")):
        raise FileNotFoundError(f"{os.path.join(manual_dir, 'train.jsonl')}: no such file (the manual dir needs it)")
    out = {}
    for filename, (split, prompts_only) in SPLIT_FILES.items():
        path = os.path.join(manual_dir, filename)
        if os.path.exists(path):
            out[split] = read_lima_jsonl(path, prompts_only, skip_invalid)
    return out


class Lima(tfds.core.GeneratorBasedBuilder):
    """LIMA conversations (arXiv 2305.11206) from LIMA-format JSONL in the manual dir."""

    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "LIMA JSONL with per-line validation."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train.jsonl (and optionally dev.jsonl, test.jsonl) in LIMA's format in the manual dir: "
        'one {"conversations": [...], "source": ...} per line.')
    # TFDS derives this from the package via `importlib_resources`, a module its 4.9.10 wheel imports but
    # does not install; naming the file directly avoids that missing dependency.
    code_path = epath.Path(__file__)

    def __init__(self, *, skip_invalid: bool = False, **kwargs):
        self._skip_invalid = skip_invalid
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "conversations": tfds.features.Sequence(tfds.features.Text()),
                "source": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int32, doc="line number in the source file"),
            }),
            homepage="https://arxiv.org/abs/2305.11206",
        )

    def _split_generators(self, dl_manager):
        read = read_manual_dir(str(dl_manager.manual_dir), self._skip_invalid)
        return {split: self._generate_examples(result.examples) for split, result in read.items()}

    def _generate_examples(self, examples):
        for ex in examples:
            yield ex["index"], ex


def build(manual_dir: str, data_dir: str, skip_invalid: bool = False) -> dict:
    """Validate the manual dir, then prepare TFDS `lima` into data_dir atomically.

    The whole input is validated before anything is written; the dataset is prepared in a temporary
    folder beside data_dir and renamed into place, so data_dir is untouched when anything fails.
    Returns {"splits": {split: n}, "skipped": [messages]}.
    """
    read = read_manual_dir(manual_dir, skip_invalid)  # raises InvalidLimaLine before any write
    for split, result in read.items():
        if not result.examples:
            raise ValueError(f"{manual_dir}: no valid examples for split {split!r}")
    data_dir = os.path.abspath(data_dir)
    parent = os.path.dirname(data_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lima-build-", dir=parent)
    tfds.disable_progress_bar()
    try:
        builder = Lima(data_dir=tmp, skip_invalid=skip_invalid)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        version_dir = os.path.join(NAME, DATA_VERSION)
        final = os.path.join(data_dir, version_dir)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        old = None
        if os.path.exists(final):  # a rebuild: swap the old version out, then delete it
            old = tempfile.mkdtemp(prefix=".lima-old-", dir=os.path.dirname(final))
            os.rename(final, os.path.join(old, DATA_VERSION))
        os.rename(os.path.join(tmp, version_dir), final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"splits": {s: len(r.examples) for s, r in read.items()},
            "skipped": [str(e) for r in read.values() for e in r.skipped]}


def load_split(data_dir: str, split: str = "train") -> list[dict]:
    """Examples of one split as Python dicts, in the builder's fixed order (for tools and tests)."""
    builder = tfds.builder(NAME, data_dir=data_dir)
    out = []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        out.append({"conversations": [t.decode("utf-8") for t in ex["conversations"]],
                    "source": ex["source"].decode("utf-8"), "index": int(ex["index"])})
    return out


def available_splits(data_dir: str) -> list[str]:
    return list(tfds.builder(NAME, data_dir=data_dir).info.splits.keys())


def check_built(data_dir: str) -> None:
    """A one-line error when data_dir holds no prepared `lima`."""
    path = os.path.join(data_dir, NAME, DATA_VERSION, "dataset_info.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{data_dir}: no prepared TFDS '{NAME}' (expected {path}); run lima-data build")
