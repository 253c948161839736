"""lima_jax/atomic.py: all-or-nothing writes."""
import os

import pytest

from lima_jax.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(str(target), "old")

    def half_then_crash(tmp):
        assert tmp.endswith(".json")  # the suffix survives, for writers that choose a format by it
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(str(target), half_then_crash)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_writes_text_and_bytes_creating_folders(tmp_path):
    atomic_write_bytes(str(tmp_path / "a" / "b.bin"), b"\x00\x01")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
