"""Atomic file writes: write a temporary file beside the target, then rename it into place, so
readers see the old file or the whole new one, never a partial write (and a crash leaves no debris)."""
from __future__ import annotations

import os
import uuid
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp_path) creates the content; it is then renamed onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder, so the rename is atomic; `write` creates the file, so it gets the usual permissions.
    # The temporary keeps the target's suffix: writers such as matplotlib pick the format from it.
    root, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{root}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
