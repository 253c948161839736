"""WritingPrompts -> LIMA pairs (LIMA §2.1, source "writingprompts").

Input: the dataset's line-aligned pair of files, `*.wp_source` (prompts, tagged "[ WP ]") and
`*.wp_target` (stories), both with the dataset's tokenised spacing and " <newline> " markers. Output:
prompt and story detokenised. Rules (first failing one counted): not_wp (a tag other than WP, e.g.
[ OT ], [ MP ]), empty, too_short / too_long (story characters outside [min_chars, max_chars]).
Then `n` pairs are sampled with the seed.
"""
from __future__ import annotations

import re
from typing import Optional


from data_pipeline.curate.common import CurationResult

_TAG = re.compile(r"^\s*\[\s*(\w+)\s*\]\s*")


def detokenize(text: str) -> str:
    """Undo the dataset's tokenised spacing ("do n't", "end ." , "`` quoted ''")."""
    text = re.sub(r"\s*<newline>\s*", "\n", text)
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r'" ([^"\n]*?) "', r'"\1"', text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r" ([.,!?;:%)\]])", r"\1", text)
    text = re.sub(r"([(\[$]) ", r"\1", text)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def curate(source_path: str, target_path: str, n: Optional[int] = 150, seed: int = 0,
           min_chars: int = 500, max_chars: int = 4096) -> CurationResult:
    result = CurationResult()
    pool = []
    with open(source_path, encoding="utf-8") as fs, open(target_path, encoding="utf-8") as ft:
        for lineno, (prompt, story) in enumerate(zip(fs, ft), start=1):
            result.seen += 1
            tag = _TAG.match(prompt)
            if not tag or tag.group(1).upper() != "WP":
                result.drop("not_wp")
                continue
            prompt, story = detokenize(prompt[tag.end():]), detokenize(story)
            if not prompt or not story:
                result.drop("empty")
                continue
            if not result.length_ok(story, min_chars, max_chars):
                continue
            pool.append({"conversations": [prompt, story], "source": "writingprompts"})
    result.keep_sample(pool, n, seed)
    return result
