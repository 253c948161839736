"""wikiHow -> LIMA pairs (LIMA §2.1, source "wikihow").

Input: the wikiHow rows (title, headline, text) as CSV (e.g. wikihowAll.csv) or JSONL. Prompt: the
title as a question, "How to X?"; response: the article text (headline summary ignored), cleaned of
links and images, with a leading "This article ..." rephrased as LIMA did ("The following answer ...").
Rules (first failing one counted): missing_field, duplicate_title, too_short / too_long (answer
characters outside [min_chars, max_chars]). Then `n` pairs are sampled with the seed.
"""
from __future__ import annotations

import csv
import json
import re
from typing import Iterable, Optional


from data_pipeline.curate.common import CurationResult


def read_rows(path: str) -> Iterable[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)


def howto_prompt(title: str) -> str:
    """'How to Bake Bread1' / 'Bake Bread' -> 'How to Bake Bread?'"""
    title = re.sub(r"\d+$", "", title.strip()).rstrip(" ?.")
    if not title.lower().startswith("how to "):
        title = "How to " + title
    return title + "?"


def clean_article(text: str) -> str:
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)                  # markdown images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)              # markdown links -> text
    text = re.sub(r"https?://\S+", "", text)                          # bare URLs
    text = re.sub(r"^\s*This article\b", "The following answer", text.strip())
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def curate(path: str, n: Optional[int] = 200, seed: int = 0, min_chars: int = 500,
           max_chars: int = 4096) -> CurationResult:
    result = CurationResult()
    titles = set()
    pool = []
    for row in read_rows(path):
        result.seen += 1
        title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
        if not title or not text:
            result.drop("missing_field")
            continue
        prompt = howto_prompt(title)
        if prompt.lower() in titles:
            result.drop("duplicate_title")
            continue
        titles.add(prompt.lower())
        answer = clean_article(text)
        if not result.length_ok(answer, min_chars, max_chars):
            continue
        pool.append({"conversations": [prompt, answer], "source": "wikihow"})
    result.keep_sample(pool, n, seed)
    return result
