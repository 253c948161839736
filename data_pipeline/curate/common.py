"""What every curation command shares: per-rule drop counts and writing LIMA-format JSONL."""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

from data_pipeline.atomic import atomic_write_text


@dataclass
class CurationResult:
    pairs: list = field(default_factory=list)          # LIMA rows {"conversations": [prompt, answer], "source"}
    dropped: collections.Counter = field(default_factory=collections.Counter)  # rule -> items it removed
    seen: int = 0

    def drop(self, rule: str) -> None:
        self.dropped[rule] += 1

    def report(self, name: str) -> str:
        lines = [f"{name}: {self.seen} candidates, kept {len(self.pairs)}"]
        lines += [f"  dropped by {rule}: {n}" for rule, n in self.dropped.items()]
        return "\n".join(lines)


def write_pairs(pairs: list, out: str) -> None:
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
