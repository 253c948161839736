"""Stack Exchange -> LIMA pairs (LIMA §2.1).

For each question (title + body as the prompt) take its top-scored answer and keep the pair when the
answer passes every rule, checked in this order (the first failing rule is the one counted):
  no_answer, low_score (< min_score), link_only, first_person ("I", "my", ...), refers_to_other_answers
  ("as mentioned", "edit:", "the accepted answer", "above"/"below", ...), too_short / too_long (markdown
  characters outside [min_chars, max_chars]).
Bodies are converted to markdown (links -> text, images dropped, code blocks and lists kept). Then pairs
are sampled per site: a quota for STEM sites and one for the others, spread over sites with LIMA's
temperature (site weight ∝ remaining^(1/τ)), without replacement.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Iterable, Optional

import numpy as np

from data_pipeline.curate.common import CurationResult
from data_pipeline.curate.html_markdown import html_to_markdown, link_stats

# Stack Exchange sites LIMA counts as STEM (programming, maths, sciences, engineering); others are "other".
STEM_SITES = frozenset("""stackoverflow superuser serverfault askubuntu unix math mathoverflow stats physics
chemistry biology cs cstheory datascience ai electronics engineering astronomy earthscience
softwareengineering codereview dba security crypto gis tex mathematica quant bioinformatics robotics
networkengineering webapps android apple dsp scicomp""".split())

_FIRST_PERSON = re.compile(r"\bI\b|\bI'(?:m|ve|d|ll)\b|\b(?i:my|mine|myself)\b")
_REFERS = re.compile(r"as (?:mentioned|noted|said|stated)|\bedit\s*:|\bupdate\s*:|accepted answer|"
                     r"other answers?|answers? (?:above|below)|\babove\b|\bbelow\b|stack ?exchange|this site",
                     re.I)
RULES = ("no_answer", "low_score", "link_only", "first_person", "refers_to_other_answers", "too_short",
         "too_long")


def _own_prose(markdown: str) -> str:
    """The answer's own words: no code (a variable `my_list` is not first person), no block quotes and no
    "quoted speech" (quoting the asker or a source is not writing in the first person)."""
    text = re.sub(r"`[^`\n]*`", " ", re.sub(r"```.*?```", " ", markdown, flags=re.S))
    text = "\n".join(line for line in text.split("\n") if not line.startswith(">"))
    return re.sub(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d', " ", text)


def is_link_only(html: str) -> bool:
    """An answer that is mainly a pointer elsewhere: links, with little text of its own."""
    links, link_chars, all_chars = link_stats(html)
    own = all_chars - link_chars
    return links > 0 and (own < 200 or link_chars >= own)


def answer_rule(answer_html: str, score: int, min_score: int, min_chars: int, max_chars: int) -> Optional[str]:
    """The first rule an answer fails, or None when it is kept."""
    if score < min_score:
        return "low_score"
    if is_link_only(answer_html):
        return "link_only"
    md = html_to_markdown(answer_html)
    prose = _own_prose(md)
    if _FIRST_PERSON.search(prose):
        return "first_person"
    if _REFERS.search(prose):
        return "refers_to_other_answers"
    if len(md) < min_chars:
        return "too_short"
    if len(md) > max_chars:
        return "too_long"
    return None


def read_posts(path: str) -> Iterable[dict]:
    """Rows of a Posts.xml dump, streamed (real dumps are many GB)."""
    for _, elem in ET.iterparse(path, events=("end",)):
        if elem.tag == "row":
            yield dict(elem.attrib)
            elem.clear()


def curate_site(path: str, site: str, min_score: int = 10, min_chars: int = 1200, max_chars: int = 4096,
                result: Optional[CurationResult] = None) -> CurationResult:
    """All pairs of one site that pass the rules (each tagged with its site)."""
    result = result or CurationResult()
    questions, top = {}, {}
    for row in read_posts(path):
        kind = row.get("PostTypeId")
        if kind == "1":
            questions[row["Id"]] = row
        elif kind == "2" and row.get("ParentId"):
            best = top.get(row["ParentId"])
            if best is None or int(row.get("Score", 0)) > int(best.get("Score", 0)):
                top[row["ParentId"]] = row
    for qid, q in questions.items():
        result.seen += 1
        answer = top.get(qid)
        if answer is None:
            result.drop("no_answer")
            continue
        rule = answer_rule(answer["Body"], int(answer.get("Score", 0)), min_score, min_chars, max_chars)
        if rule:
            result.drop(rule)
            continue
        prompt = f"{q.get('Title', '').strip()}\n{html_to_markdown(q.get('Body', ''))}".strip()
        result.pairs.append({"conversations": [prompt, html_to_markdown(answer["Body"])],
                             "source": "stackexchange", "site": site})
    return result


def sample_with_temperature(by_site: dict[str, list], quota: int, temperature: float, rng) -> list:
    """Up to `quota` items over sites, site picked with weight ∝ remaining^(1/τ), no replacement."""
    pools = {s: list(items) for s, items in sorted(by_site.items()) if items}
    for s in pools:
        rng.shuffle(pools[s])
    out = []
    while pools and len(out) < quota:
        sites = list(pools)
        weights = np.array([len(pools[s]) for s in sites], float) ** (1.0 / temperature)
        site = sites[rng.choice(len(sites), p=weights / weights.sum())]
        out.append(pools[site].pop())
        if not pools[site]:
            del pools[site]
    return out


def site_name(spec: str) -> tuple[str, str]:
    """`SITE=PATH` or a path (site = the folder name, e.g. math.stackexchange.com/Posts.xml -> math)."""
    if "=" in spec:
        site, path = spec.split("=", 1)
        return site, path
    folder = os.path.basename(os.path.dirname(os.path.abspath(spec)))
    return folder.split(".")[0], spec


def curate(posts: list[str], stem_quota: int = 200, other_quota: int = 200, temperature: float = 3.0,
           seed: int = 0, min_score: int = 10, min_chars: int = 1200, max_chars: int = 4096,
           stem_sites: frozenset = STEM_SITES) -> CurationResult:
    """Pairs from several sites' Posts.xml (`SITE=PATH` or PATH), sampled with STEM / other quotas."""
    result = CurationResult()
    by_group: dict[str, dict[str, list]] = {"stem": {}, "other": {}}
    for spec in posts:
        site, path = site_name(spec)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such Posts.xml")
        before = len(result.pairs)
        curate_site(path, site, min_score, min_chars, max_chars, result)
        group = "stem" if site in stem_sites else "other"
        by_group[group].setdefault(site, []).extend(result.pairs[before:])
    rng = np.random.default_rng(seed)
    picked = (sample_with_temperature(by_group["stem"], stem_quota, temperature, rng)
              + sample_with_temperature(by_group["other"], other_quota, temperature, rng))
    over_quota = len(result.pairs) - len(picked)
    if over_quota:
        result.dropped["over_site_quota"] += over_quota
    result.pairs = [{"conversations": p["conversations"], "source": p["source"]} for p in picked]
    return result
