"""What every curation command shares: per-rule drop counts and writing LIMA-format JSONL."""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lima_jax.atomic import atomic_write_text


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

    def length_ok(self, text: str, min_chars: int, max_chars: int) -> bool:
        """The length rule: counts too_short / too_long drops."""
        if len(text) < min_chars:
            self.drop("too_short")
            return False
        if len(text) > max_chars:
            self.drop("too_long")
            return False
        return True

    def keep_sample(self, pool: list, n: Optional[int], seed: int) -> None:
        """Keeps n items of `pool` drawn with `seed` (in pool order); the rest count as over_quota."""
        if n is not None and len(pool) > n:
            keep = sorted(np.random.default_rng(seed).choice(len(pool), n, replace=False))
            self.dropped["over_quota"] += len(pool) - n
            pool = [pool[i] for i in keep]
        self.pairs = pool


def write_pairs(pairs: list, out: str) -> None:
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
