"""Super-NaturalInstructions -> LIMA pairs (LIMA §2.1, source "nlp").

One instance sampled per task file (with a seed); prompt = the task's Definition, a blank line, the
instance's input; response = one of the instance's reference outputs (sampled with the same seed).
Rules (first failing one counted): not_json, no_definition, not_english (task input or output language),
no_instances, empty_output (no non-empty reference output for the sampled instance).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import numpy as np

from data_pipeline.curate.common import CurationResult


def task_files(paths: list[str]) -> list[str]:
    """Task JSON files from files or folders (sorted, so sampling does not depend on listing order)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += glob.glob(os.path.join(p, "*.json"))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such task file or folder")
    return sorted(out)


def _definition(task: dict) -> str:
    d = task.get("Definition")
    return ("\n".join(d) if isinstance(d, list) else (d or "")).strip()


def curate_task(task: dict, rng, result: CurationResult) -> Optional[dict]:
    definition = _definition(task)
    if not definition:
        result.drop("no_definition")
        return None
    langs = set(task.get("Input_language", ["English"])) | set(task.get("Output_language", ["English"]))
    if langs - {"English"}:
        result.drop("not_english")
        return None
    instances = task.get("Instances") or []
    if not instances:
        result.drop("no_instances")
        return None
    inst = instances[int(rng.integers(len(instances)))]
    outputs = inst.get("output")
    outputs = [o for o in (outputs if isinstance(outputs, list) else [outputs]) if isinstance(o, str) and o.strip()]
    if not outputs:
        result.drop("empty_output")
        return None
    answer = outputs[int(rng.integers(len(outputs)))].strip()
    prompt = f"{definition}\n\n{str(inst.get('input', '')).strip()}".strip()
    return {"conversations": [prompt, answer], "source": "nlp"}


def curate(paths: list[str], seed: int = 0, max_tasks: Optional[int] = None) -> CurationResult:
    result = CurationResult()
    files = task_files(paths)
    rng = np.random.default_rng(seed)
    for path in files:
        result.seen += 1
        try:
            with open(path, encoding="utf-8") as f:
                task = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            result.drop("not_json")
            continue
        # One generator per task, derived from (seed, file name): adding a task does not reshuffle others.
        task_rng = np.random.default_rng([seed, *os.path.basename(path).encode()])
        pair = curate_task(task, task_rng, result)
        if pair:
            result.pairs.append(pair)
    if max_tasks is not None and len(result.pairs) > max_tasks:
        keep = sorted(rng.choice(len(result.pairs), max_tasks, replace=False))
        result.dropped["over_quota"] += len(result.pairs) - max_tasks
        result.pairs = [result.pairs[i] for i in keep]
    return result
