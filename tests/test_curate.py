"""data_pipeline/curate: HTML -> markdown, and each curation rule removing what it must."""
from __future__ import annotations

import csv
import json
import os
from xml.sax.saxutils import quoteattr

import pytest

from data_pipeline.curate import natinst, stackexchange, wikihow, writingprompts
from data_pipeline.curate.html_markdown import html_to_markdown
from tests.conftest import SHARED

POSTS = os.path.join(SHARED, "assets", "raw", "stackexchange", "Posts.sample.xml")
NATINST = os.path.join(SHARED, "assets", "raw", "natural-instructions",
                       "task045_miscellaneous_sentence_paraphrasing.excerpt.json")
needs_posts = pytest.mark.skipif(not os.path.exists(POSTS), reason=f"../shared Stack Exchange sample absent ({POSTS})")
needs_natinst = pytest.mark.skipif(not os.path.exists(NATINST), reason=f"../shared NatInst excerpt absent ({NATINST})")

# Long enough (> 1200 characters once converted) to pass the length rule on its own.
FILLER = ("<p>" + "Heat moves from the warmer body to the colder one until both reach the same temperature. " * 16
          + "</p>")
CODE = "<pre><code>def area(r):\n    return 3.14159 * r ** 2\n</code></pre>"


def test_html_to_markdown_keeps_code_and_lists_and_strips_links_and_images():
    html = ('<p>See <a href="https://example.org">the manual</a> <img src="x.png" alt="diagram"> and use '
            '<code>area()</code>:</p>' + CODE + '<ol><li>first</li><li>second</li></ol><ul><li>a</li></ul>')
    md = html_to_markdown(html)
    assert "See the manual and use `area()`:" in md
    assert "```\ndef area(r):\n    return 3.14159 * r ** 2\n```" in md
    assert "1. first\n2. second" in md and "- a" in md
    assert "https://" not in md and "x.png" not in md and "diagram" not in md


def write_posts(path, answers: dict) -> None:
    """One question per answer body (score 20), plus one question without any answer."""
    rows = []
    for i, (name, (body, score)) in enumerate(answers.items()):
        q, a = 2 * i + 1, 2 * i + 2
        rows.append(f'<row Id="{q}" PostTypeId="1" Score="5" Title={quoteattr("Question " + name)} '
                    f'Body={quoteattr("<p>Why does this happen?</p>")} />')
        rows.append(f'<row Id="{a}" PostTypeId="2" ParentId="{q}" Score="{score}" Body={quoteattr(body)} />')
        rows.append(f'<row Id="{a + 1000}" PostTypeId="2" ParentId="{q}" Score="1" Body={quoteattr(FILLER)} />')
    rows.append('<row Id="999" PostTypeId="1" Score="3" Title="Unanswered" Body="&lt;p&gt;?&lt;/p&gt;" />')
    with open(path, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + "\n</posts>\n")


def test_stackexchange_rules_each_remove_what_they_must(tmp_path):
    answers = {
        "good": (FILLER + CODE, 20),
        "first_person": ("<p>I think so.</p>" + FILLER, 20),
        "my": ("<p>In my view, yes.</p>" + FILLER, 20),
        "link_only": ('<p>See <a href="https://example.org">this excellent and thorough explanation</a>.</p>', 20),
        "too_short": ("<p>Heat flows to the colder body.</p>", 20),
        "too_long": (FILLER * 4, 20),
        "as_mentioned": ("<p>As mentioned, heat flows.</p>" + FILLER, 20),
        "edit": (FILLER + "<p>Edit: fixed a typo.</p>", 20),
        "accepted": ("<p>The accepted answer is wrong.</p>" + FILLER, 20),
        "above": ("<p>The answer above is right.</p>" + FILLER, 20),
        "low_score": (FILLER, 3),
        "quoted_i": ('<blockquote><p>Am I right?</p></blockquote>' + FILLER, 20),
    }
    path = tmp_path / "Posts.xml"
    write_posts(path, answers)
    result = stackexchange.curate([f"physics={path}"], stem_quota=100, other_quota=100, min_score=10)
    assert result.seen == len(answers) + 1
    assert dict(result.dropped) == {"first_person": 2, "link_only": 1, "too_short": 1, "too_long": 1,
                                    "refers_to_other_answers": 4, "low_score": 1, "no_answer": 1}
    assert len(result.pairs) == 2
    prompts = sorted(p["conversations"][0] for p in result.pairs)
    assert prompts[0].startswith("Question good\nWhy does this happen?")
    good = next(p for p in result.pairs if p["conversations"][0].startswith("Question good"))
    assert "```\ndef area(r):\n    return 3.14159 * r ** 2\n```" in good["conversations"][1]
    assert good["source"] == "stackexchange" and set(good) == {"conversations", "source"}


def test_stackexchange_site_quotas(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_posts(a, {f"q{i}": (FILLER, 20) for i in range(5)})
    write_posts(b, {f"q{i}": (FILLER, 20) for i in range(5)})
    result = stackexchange.curate([f"math={a}", f"history={b}"], stem_quota=2, other_quota=3)
    assert len(result.pairs) == 5 and result.dropped["over_site_quota"] == 5
    again = stackexchange.curate([f"math={a}", f"history={b}"], stem_quota=2, other_quota=3)
    assert again.pairs == result.pairs


@needs_posts
def test_stackexchange_sample_dump_gives_lima_pairs():
    result = stackexchange.curate([f"history={POSTS}"], min_score=1)
    assert result.seen == 70
    assert result.pairs, result.report("stackexchange")
    for pair in result.pairs:
        assert pair["source"] == "stackexchange" and len(pair["conversations"]) == 2
        answer = pair["conversations"][1]
        assert 1200 <= len(answer) <= 4096 and "<p>" not in answer and "href" not in answer
    assert result.dropped["first_person"] > 0 and result.dropped["no_answer"] > 0


@needs_natinst
def test_natinst_excerpt_yields_one_pair():
    with open(NATINST) as f:
        task = json.load(f)
    result = natinst.curate([NATINST], seed=0)
    assert result.seen == 1 and len(result.pairs) == 1
    prompt, answer = result.pairs[0]["conversations"]
    assert result.pairs[0]["source"] == "nlp"
    assert prompt.startswith(task["Definition"].strip())
    instance = next(i for i in task["Instances"] if prompt.endswith(i["input"].strip()))
    assert answer in [o.strip() for o in instance["output"]]


def test_natinst_rules(tmp_path):
    base = {"Definition": "Answer the question.", "Input_language": ["English"], "Output_language": ["English"],
            "Instances": [{"input": "2 + 2?", "output": ["4"]}]}
    cases = {"ok": base, "fr": {**base, "Output_language": ["French"]}, "none": {**base, "Instances": []},
             "nodef": {**base, "Definition": ""}, "empty": {**base, "Instances": [{"input": "x", "output": [""]}]}}
    for name, task in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(task))
    (tmp_path / "broken.json").write_text("{")
    result = natinst.curate([str(tmp_path)])
    assert [p["conversations"] for p in result.pairs] == [["Answer the question.\n\n2 + 2?", "4"]]
    assert dict(result.dropped) == {"not_english": 1, "no_instances": 1, "no_definition": 1,
                                    "empty_output": 1, "not_json": 1}


ARTICLE = ("This article explains how to repot a houseplant. Choose a pot one size larger than the old one, "
           "with a drainage hole. Water the plant a day before so the root ball holds together. Tip the pot "
           "on its side and slide the plant out, then loosen circling roots with your fingers. Add fresh "
           "potting mix to the new pot, set the plant at the same depth as before, fill around it and water "
           "well. See [our guide](https://example.org/guide) for more. ![photo](https://example.org/p.jpg)")


def test_wikihow_rows(tmp_path):
    path = tmp_path / "wikihow.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["headline", "title", "text"])
        w.writeheader()
        w.writerow({"headline": "Repot it.", "title": "How to Repot a Houseplant1", "text": ARTICLE})
        w.writerow({"headline": "Again.", "title": "Repot a Houseplant", "text": ARTICLE})
        w.writerow({"headline": "Short.", "title": "Tie a Knot", "text": "Loop and pull."})
        w.writerow({"headline": "", "title": "", "text": ARTICLE})
    result = wikihow.curate(str(path), n=10, min_chars=200)
    assert dict(result.dropped) == {"duplicate_title": 1, "too_short": 1, "missing_field": 1}
    [pair] = result.pairs
    prompt, answer = pair["conversations"]
    assert prompt == "How to Repot a Houseplant?" and pair["source"] == "wikihow"
    assert answer.startswith("The following answer explains how to repot")
    assert "https://" not in answer and "our guide" in answer and "photo" not in answer


def test_writingprompts_pairs(tmp_path):
    story = ("The rain had not stopped for nine days , and the town had started to float . <newline> <newline> "
             "`` Hold on , '' said the mayor , who did n't know what else to say . ") * 5
    src, tgt = tmp_path / "valid.wp_source", tmp_path / "valid.wp_target"
    src.write_text("[ WP ] A town starts to float after nine days of rain .\n"
                   "[ OT ] Tell us about your week .\n"
                   "[ WP ] A very short one .\n")
    tgt.write_text(story + "\n" + story + "\n" + "Too short .\n")
    result = writingprompts.curate(str(src), str(tgt), n=10)
    assert dict(result.dropped) == {"not_wp": 1, "too_short": 1}
    [pair] = result.pairs
    prompt, text = pair["conversations"]
    assert prompt == "A town starts to float after nine days of rain."
    assert text.startswith("The rain had not stopped for nine days, and the town had started to float.\n\n"
                           "\"Hold on,\" said the mayor, who didn't know what else to say.")
    assert pair["source"] == "writingprompts"
