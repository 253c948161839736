"""How every console script ends: 0 on success, 2 on bad input or usage with one line
`<command>: error: ...` on stderr, 1 on an unexpected failure (Python's traceback)."""
from __future__ import annotations

import sys

# What bad input raises: missing or unreadable files (OSError), malformed files, values and gin
# bindings (ValueError, which the project's own input errors subclass).
INPUT_ERRORS = (ValueError, OSError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (its first line; the type's name if it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def input_error(prog: str, error: BaseException) -> int:
    """Prints `<prog>: error: <message>` and returns the exit status for bad input (2)."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2
