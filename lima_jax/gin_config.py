"""Parsing the project's gin files: `gin/` on the search path, bad files and bindings as one-line errors."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import gin

GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
_searched: list[str] = []  # what this module added to gin's search path (gin's own list is private)


class GinError(ValueError):
    """A gin file that cannot be found or parsed, or a binding gin rejects; str() is one line."""


def resolve(gin_file: str) -> str:
    """A gin file as given (relative to the working directory), else under the project's gin/."""
    for candidate in (gin_file, os.path.join(GIN_ROOT, gin_file)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise GinError(f"{gin_file}: no such gin file (looked in the working directory and {GIN_ROOT})")


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str], skip_unknown: Sequence[str] = ()) -> None:
    """Clears gin and parses the files (later ones win), then the bindings. Includes inside the files
    ('models/tiny.gin') resolve against the project's gin/ too. skip_unknown: configurables whose
    bindings are ignored when that configurable is not registered (not imported) in this program."""
    files = [resolve(f) for f in gin_files]
    gin.clear_config()
    if not _searched:
        gin.add_config_file_search_path(GIN_ROOT)
        _searched.append(GIN_ROOT)
    try:
        with _quiet_lookups():
            # Not finalized (locked): modules imported later (lima-decode's after lima-train's, in the
            # demo's one process) can still register their configurables.
            gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False,
                                                skip_unknown=list(skip_unknown))
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise GinError(f"gin: {' '.join(str(e).split())}") from None


@contextlib.contextmanager
def _quiet_lookups() -> Iterator[None]:
    """Drops the "Path not found" error that gin's package-resource reader logs for every search-path
    entry an include misses before the one that holds it (a file found nowhere still raises)."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
