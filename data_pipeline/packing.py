"""Recipe-exact packing: one step's examples, in rows of max_len tokens, several examples per row.

The step keeps exactly its examples (LIMA: the 32 of the padded step); only their layout changes.
Rows are filled first-fit decreasing (longest first; ties in the step's order), so the layout
depends on the step's examples alone, not on the mesh or the host count: every host computes the
same global rows and keeps its block of them, and empty rows pad the count up to a bucket. Each token
carries its example's segment id (1, 2, ... within the row; 0 = padding) and its position inside its
own example, so attention stays within an example and RoPE sees the positions it would see alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
SEGMENT_FEATURES = ("decoder_segment_ids", "decoder_positions")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of indices into `lengths` (each ≤ capacity), each row's total ≤ capacity; longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if not 0 < lengths[i] <= capacity:
            raise ValueError(f"example length {lengths[i]} is outside 1..{capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def choose_buckets(rows_per_step: Sequence[int], multiple: int, max_buckets: int = 3) -> list[int]:
    """At most `max_buckets` row counts (multiples of `multiple`) covering every step's rows, chosen to
    minimise the rows computed over these steps (dynamic programming over the distinct needs)."""
    needs = sorted({round_up(max(int(n), 1), multiple) for n in rows_per_step})
    counts = {n: sum(round_up(max(int(r), 1), multiple) == n for r in rows_per_step) for n in needs}
    # best[k][j]: least rows for needs[:j+1] with k buckets, the last one at needs[j].
    k_max = min(max_buckets, len(needs))
    inf = float("inf")
    best = [[inf] * len(needs) for _ in range(k_max + 1)]
    back = [[-1] * len(needs) for _ in range(k_max + 1)]
    for j, top in enumerate(needs):
        best[1][j] = top * sum(counts[n] for n in needs[:j + 1])
    for k in range(2, k_max + 1):
        for j in range(len(needs)):
            for i in range(j):
                cost = best[k - 1][i] + needs[j] * sum(counts[n] for n in needs[i + 1:j + 1])
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, k_max + 1), key=lambda k: best[k][-1])
    chosen, j = [], len(needs) - 1
    while j >= 0 and k >= 1:
        chosen.append(needs[j])
        j, k = back[k][j], k - 1
    return sorted(chosen)


def bucket_for(rows: int, buckets: Sequence[int], fallback: int) -> int:
    """The smallest bucket holding `rows`, else `fallback` (the padded row count, which always holds a step)."""
    return next((b for b in sorted(buckets) if b >= rows), fallback)


def pack(features: dict, lengths: Sequence[int], ids: Sequence[int], num_rows: int, max_len: int,
         layout=None) -> dict:
    """The examples `ids` (indices into the [N, max_len] feature arrays, -1 = none) packed into
    `num_rows` rows: the token features plus segment ids and positions, all [num_rows, max_len].
    layout: first_fit_decreasing of the real ids' lengths, if the caller has it already."""
    real = [int(i) for i in ids if i >= 0]
    if layout is None:
        layout = first_fit_decreasing([int(lengths[i]) for i in real], max_len)
    if len(layout) > num_rows:
        raise ValueError(f"{len(real)} examples need {len(layout)} rows of {max_len}; got {num_rows}")
    out = {k: np.zeros((num_rows, max_len), features[k].dtype) for k in TOKEN_FEATURES}
    out.update({k: np.zeros((num_rows, max_len), np.int32) for k in SEGMENT_FEATURES})
    for r, members in enumerate(layout):
        start = 0
        for segment, m in enumerate(members, start=1):
            i, n = real[m], int(lengths[real[m]])
            for k in TOKEN_FEATURES:
                out[k][r, start:start + n] = features[k][i, :n]
            out["decoder_segment_ids"][r, start:start + n] = segment
            out["decoder_positions"][r, start:start + n] = np.arange(n)
            start += n
    return out


def unpacked(features: dict, lengths: Sequence[int], ids: Sequence[int], max_len: int) -> dict:
    """One example per row (padded rows; -1 = an empty row), with the same segment features."""
    out = {k: np.zeros((len(ids), max_len), features[k].dtype) for k in TOKEN_FEATURES}
    out.update({k: np.zeros((len(ids), max_len), np.int32) for k in SEGMENT_FEATURES})
    for r, i in enumerate(ids):
        if i < 0:
            continue
        n = int(lengths[i])
        for k in TOKEN_FEATURES:
            out[k][r] = features[k][i]
        out["decoder_segment_ids"][r, :n] = 1
        out["decoder_positions"][r, :n] = np.arange(n)
    return out
