"""Session fixtures shared by the data-pipeline tests: the demo set (own tokenizer) and the LIMA sample, built once."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import LIMA_SAMPLE, LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """(tfds data_dir, tokenizer path, manual dir) for the project's demo data."""
    from data_pipeline import demo_data, lima_dataset

    root = tmp_path_factory.mktemp("demo")
    manual = str(root / "manual")
    demo_data.write_demo_data(manual)
    tok = demo_data.train_demo_tokenizer(str(root))
    data_dir = str(root / "tfds")
    lima_dataset.build(manual, data_dir)
    return data_dir, tok, manual


@pytest.fixture(scope="session")
def lima_sample_build(tmp_path_factory):
    """(tfds data_dir, LLaMA tokenizer path) for ../shared's 44-row LIMA sample."""
    if not (os.path.exists(LIMA_SAMPLE) and os.path.exists(LLAMA_TOKENIZER)):
        pytest.skip(f"../shared LIMA sample or LLaMA tokenizer absent ({LIMA_SAMPLE}, {LLAMA_TOKENIZER})")
    from data_pipeline import lima_dataset

    root = tmp_path_factory.mktemp("lima_sample")
    manual = root / "manual"
    manual.mkdir()
    shutil.copy(LIMA_SAMPLE, manual / "train.jsonl")
    data_dir = str(root / "tfds")
    lima_dataset.build(str(manual), data_dir)
    return data_dir, LLAMA_TOKENIZER
