"""JSON Lines input: one JSON object a line. The callers add the file and line to the message."""
from __future__ import annotations

import json


def parse_object(text: str) -> dict:
    """The JSON object on one line; a ValueError saying what is wrong with it otherwise."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row
