"""lima_jax/report.py and lima-report: preferences (Figure 1), audit (Figure 3), Likert (§5), templates."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from lima_jax import report
from lima_jax.cli.report import main

# LIMA Figure 1, human preference over the 300 test prompts: (LIMA wins, tie, LIMA loses) in percent.
FIGURE1 = {"Alpaca 65B": (53, 21, 26), "DaVinci003": (44, 21, 35), "BARD": (33, 25, 42),
           "Claude": (24, 22, 54), "GPT-4": (18, 25, 57)}
# Items with 2-3 annotators, labels from LIMA's side. With 1/k weights they add up to whole labels:
#   (win, loss) + (loss, win)            -> 1 win, 1 loss
#   (win, win, tie) + (tie, tie, win)    -> 2/3+1/3 = 1 win, 1/3+2/3 = 1 tie
#   3 x (win, tie, loss)                 -> 1 win, 1 tie, 1 loss
# = 3 wins, 2 ties, 2 losses over 7 items; the other 93 items have one annotator each.
MULTI = [("win", "loss"), ("loss", "win"), ("win", "win", "tie"), ("tie", "tie", "win")] + [("win", "tie", "loss")] * 3


def _line(prompt_id, opponent, annotator, outcome, rng, model="LIMA"):
    """One annotation as a user would have it: LIMA's position drawn at random, the label in a/b."""
    lima_first = rng.random() < 0.5
    a, b = (model, opponent) if lima_first else (opponent, model)
    ours, theirs = ("a", "b") if lima_first else ("b", "a")
    pref = {"win": ours, "loss": theirs, "tie": "tie"}[outcome]
    return {"prompt_id": prompt_id, "model_a": a, "model_b": b, "annotator": annotator, "preference": pref}


def figure1_lines(seed=0):
    rng = random.Random(seed)
    lines = []
    for opponent, (w, t, l) in FIGURE1.items():
        singles = ["win"] * (w - 3) + ["tie"] * (t - 2) + ["loss"] * (l - 2)
        items = [(o,) for o in singles] + MULTI
        assert len(items) == 100
        rng.shuffle(items)
        for pid, labels in enumerate(items):
            annotators = rng.sample([f"crowd{i}" for i in range(6)], len(labels))
            lines += [_line(pid, opponent, ann, o, rng) for ann, o in zip(annotators, labels)]
    return lines  # opponents in Figure 1's order; items shuffled, positions random


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_figure1_fixture_reproduces_the_paper(tmp_path, capsys):
    lines = figure1_lines()
    ann = write_jsonl(tmp_path / "ann.jsonl", lines)
    out_json, out_png = str(tmp_path / "out" / "prefs.json"), str(tmp_path / "out" / "prefs.png")
    assert main(["preferences", ann, "--model", "LIMA", "--json", out_json, "--plot", out_png]) == 0
    got = json.load(open(out_json))
    assert list(got["vs"]) == list(FIGURE1)  # first-appearance order, as in the figure
    for opponent, (w, t, l) in FIGURE1.items():
        r = got["vs"][opponent]
        assert (r["win"], r["tie"], r["loss"]) == pytest.approx((w / 100, t / 100, l / 100), abs=1e-12)
        assert r["n"] == 100 and r["n_labels"] == 93 + 19
        for o in report.OUTCOMES:
            lo, hi = r["ci"][o]
            assert lo <= r[o] <= hi and 0.05 < hi - lo < 0.3
        # The fixture can tell 1/k weights from counting annotations: per annotation it would be off.
        naive = [sum(1 for x in lines if _is(x, opponent, o)) / r["n_labels"] for o in report.OUTCOMES]
        assert max(abs(n - p / 100) for n, p in zip(naive, (w, t, l))) > 0.01
    # Agreement, per opponent: (win,loss),(loss,win): 0 points / 1 pair each; (win,win,tie): 1+.5+.5 = 2
    # over 3 pairs; (tie,tie,win): 2 over 3; each (win,tie,loss): .5+0+.5 = 1 over 3, three of them: 3
    # over 9. Total 7 points / 17 pairs per opponent, 35 / 85 over 5 opponents, from 7 x 5 = 35 items.
    assert got["agreement"] == {"tie_discounted": pytest.approx(7 / 17), "n_items": 35, "n_pairs": 85}
    table = capsys.readouterr().out
    assert "53.0%" in table and "57.0%" in table and "41.2%" in table
    import matplotlib.image
    assert os.path.getsize(out_png) > 0 and matplotlib.image.imread(out_png).ndim == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["prefs.json", "prefs.png"]  # no temp files left


def test_preference_plot_draws_the_fractions(tmp_path):
    rep = report.preference_report(report.read_preferences(write_jsonl(tmp_path / "a.jsonl", figure1_lines()), "LIMA"), 10)
    ax = report.plot_preferences(rep, "LIMA", str(tmp_path / "f.png")).axes[0]
    bars = ax.patches  # drawn segment by segment: all wins, then all ties, then all losses
    widths = np.array([b.get_width() for b in bars]).reshape(3, len(FIGURE1)).T
    assert widths == pytest.approx(np.array(list(FIGURE1.values())) / 100)
    # Opponents top to bottom in Figure 1's order, and the legend names the segments.
    by_height = sorted(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()]), reverse=True)
    assert [name for _, name in by_height] == list(FIGURE1)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["LIMA wins", "Tie", "opponent wins"]


def _is(line, opponent, outcome):
    if opponent not in (line["model_a"], line["model_b"]):
        return False
    ours = "a" if line["model_a"] == "LIMA" else "b"
    label = "tie" if line["preference"] == "tie" else ("win" if line["preference"] == ours else "loss")
    return label == outcome


def test_hand_computed_agreement_pools_pairs_after_position_normalization(tmp_path):
    L = "LIMA"
    rows = [
        # p1 vs X: both prefer LIMA, seen in opposite positions ("a" vs "b"): agree -> 1 point.
        {"prompt_id": "p1", "model_a": L, "model_b": "X", "annotator": "u", "preference": "a"},
        {"prompt_id": "p1", "model_a": "X", "model_b": L, "annotator": "v", "preference": "b"},
        # p2 vs X: win vs tie -> 0.5.
        {"prompt_id": "p2", "model_a": L, "model_b": "X", "annotator": "u", "preference": "a"},
        {"prompt_id": "p2", "model_a": "X", "model_b": L, "annotator": "v", "preference": "tie"},
        # p3 vs X: both said "a", but LIMA was a for u and b for v: win vs loss -> 0.
        {"prompt_id": "p3", "model_a": L, "model_b": "X", "annotator": "u", "preference": "a"},
        {"prompt_id": "p3", "model_a": "X", "model_b": L, "annotator": "v", "preference": "a"},
        # p4 vs Y: tie, tie, loss -> (tie,tie) 1 + (tie,loss) 0.5 + (tie,loss) 0.5 = 2 over 3 pairs.
        {"prompt_id": "p4", "model_a": L, "model_b": "Y", "annotator": "u", "preference": "tie"},
        {"prompt_id": "p4", "model_a": L, "model_b": "Y", "annotator": "v", "preference": "tie"},
        {"prompt_id": "p4", "model_a": "Y", "model_b": L, "annotator": "w", "preference": "a"},
        # p5 vs Y: one annotator -> not part of agreement.
        {"prompt_id": "p5", "model_a": L, "model_b": "Y", "annotator": "u", "preference": "b"},
    ]
    got = report.preference_report(report.read_preferences(write_jsonl(tmp_path / "a.jsonl", rows), L), 100)
    # Pooled over pairs: (1 + 0.5 + 0 + 2) / (1 + 1 + 1 + 3) = 3.5 / 6. (Averaging per item first would
    # give (1 + 0.5 + 0 + 2/3) / 4 = 0.5417; the documented choice is pooling.)
    assert got["agreement"] == {"tie_discounted": pytest.approx(3.5 / 6), "n_items": 4, "n_pairs": 6}
    # Win/tie/loss from LIMA's side, 1/k per item. X: p1 win, p2 (win+tie)/2, p3 (win+loss)/2.
    x = got["vs"]["X"]
    assert (x["win"], x["tie"], x["loss"]) == pytest.approx(((1 + .5 + .5) / 3, .5 / 3, .5 / 3))
    # Y: p4 (tie, tie, loss) -> 2/3 tie, 1/3 loss; p5 loss.
    y = got["vs"]["Y"]
    assert (y["win"], y["tie"], y["loss"]) == pytest.approx((0, (2 / 3) / 2, (1 / 3 + 1) / 2))


def test_one_over_k_weighting():
    items = {"GPT-4": {"1": {"u": "win", "v": "loss", "w": "loss"}, "2": {"u": "win"}}}
    r = report.preference_report(items, n_bootstrap=50)["vs"]["GPT-4"]
    # Item 1 gives 1/3 win, 2/3 loss; item 2 one whole win; each item counts once: /2.
    # (Counting annotations instead would give win 2/4 = 0.5.)
    assert (r["win"], r["tie"], r["loss"]) == pytest.approx(((1 / 3 + 1) / 2, 0, (2 / 3) / 2))
    assert r["n"] == 2 and r["n_labels"] == 4


def test_positions_are_undone(tmp_path):
    rng = random.Random(1)
    rows = [_line(i, "BARD", "u", o, rng) for i, o in enumerate(["win"] * 6 + ["tie"] * 3 + ["loss"] * 1)]
    assert {r["model_a"] for r in rows} == {"LIMA", "BARD"}  # both positions occur
    swapped = [{**r, "model_a": r["model_b"], "model_b": r["model_a"],
                "preference": {"a": "b", "b": "a", "tie": "tie"}[r["preference"]]} for r in rows]
    got = [report.preference_report(report.read_preferences(write_jsonl(tmp_path / f"{n}.jsonl", rs), "LIMA"), 100)
           for n, rs in (("orig", rows), ("swapped", swapped))]
    assert got[0] == got[1]
    assert (got[0]["vs"]["BARD"]["win"], got[0]["vs"]["BARD"]["tie"]) == pytest.approx((0.6, 0.3))
    # The opponent's view of the same file is the mirror image.
    bard = report.preference_report(report.read_preferences(str(tmp_path / "orig.jsonl"), "BARD"), 100)
    assert (bard["vs"]["LIMA"]["win"], bard["vs"]["LIMA"]["loss"]) == pytest.approx((0.1, 0.6))


def test_bootstrap_resamples_items_with_a_fixed_seed():
    scores = np.linspace(1, 6, 40)
    ci = report.bootstrap_ci(scores, 500, seed=0)
    assert np.array_equal(ci, report.bootstrap_ci(scores, 500, seed=0))
    assert not np.array_equal(ci, report.bootstrap_ci(scores, 500, seed=1))
    assert not np.array_equal(ci, report.bootstrap_ci(scores, 500, seed=0, name="other group"))
    rows = np.array([[1.0, 0.0]] * 50 + [[0.0, 1.0]] * 50)
    ci = report.bootstrap_ci(rows, 2000, seed=0)
    # p = 0.5 over 100 items: the normal approximation's half-width is 1.96 * sqrt(.25 / 100) = 0.098.
    assert (ci[1, 0] - ci[0, 0]) / 2 == pytest.approx(0.098, abs=0.015)
    assert np.array_equal(report.bootstrap_ci(np.ones((5, 1)), 100, 0), [[1.0], [1.0]])


def test_audit(tmp_path, capsys):
    # LIMA Figure 3 style: 50 prompts, 6 fail / 19 pass / 25 excellent; plus a model whose prompt 0
    # has two labels (fail, excellent: 1/2 each) and prompt 1 one (pass).
    rows = [{"prompt_id": i, "label": lab, "model": "LIMA"}
            for i, lab in enumerate(["fail"] * 6 + ["pass"] * 19 + ["excellent"] * 25)]
    rows += [{"prompt_id": 0, "label": "fail", "model": "other"}, {"prompt_id": 0, "label": "excellent", "model": "other"},
             {"prompt_id": 1, "label": "pass", "model": "other"}]
    path = write_jsonl(tmp_path / "audit.jsonl", rows)
    out_json, out_png = str(tmp_path / "audit.json"), str(tmp_path / "audit.png")
    assert main(["audit", path, "--json", out_json, "--plot", out_png, "--n_bootstrap", "200"]) == 0
    got = json.load(open(out_json))["groups"]
    lima = got["LIMA"]
    assert (lima["fail"], lima["pass"], lima["excellent"], lima["n"]) == pytest.approx((0.12, 0.38, 0.50, 50))
    other = got["other"]
    assert (other["fail"], other["pass"], other["excellent"]) == pytest.approx((0.25, 0.5, 0.25))
    assert other["n"] == 2 and other["n_labels"] == 3
    assert lima["ci"]["excellent"][0] < 0.5 < lima["ci"]["excellent"][1]
    out = capsys.readouterr().out
    assert "12.0%" in out and "50.0%" in out
    import matplotlib.image
    assert matplotlib.image.imread(out_png).ndim == 3


def test_audit_without_model_is_one_group(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt_id": 1, "label": "pass"}, {"prompt_id": 2, "label": "fail"}])
    got = report.audit_report(report.read_audit(path), 50)["groups"]
    assert list(got) == ["all"] and got["all"]["pass"] == 0.5


def test_likert(tmp_path, capsys):
    rows = [{"prompt_id": i, "score": s, "condition": "stackexchange"} for i, s in enumerate([3, 4, 5, 4])]
    # wikihow: prompt 0 has two scores (2, 4) -> item score 3; items 3, 6, 6.
    rows += [{"prompt_id": 0, "score": 2, "condition": "wikihow"}, {"prompt_id": 0, "score": 4, "condition": "wikihow"},
             {"prompt_id": 1, "score": 6, "condition": "wikihow"}, {"prompt_id": 2, "score": 6, "condition": "wikihow"}]
    path = write_jsonl(tmp_path / "likert.jsonl", rows)
    out_json, out_png = str(tmp_path / "l.json"), str(tmp_path / "l.png")
    assert main(["likert", path, "--json", out_json, "--plot", out_png, "--n_bootstrap", "300"]) == 0
    got = json.load(open(out_json))["groups"]
    se, wh = got["stackexchange"], got["wikihow"]
    # stackexchange: mean 4, std sqrt((1 + 0 + 1 + 0) / 3) = 0.8165.
    assert (se["mean"], se["std"], se["n"]) == pytest.approx((4.0, np.sqrt(2 / 3), 4))
    # wikihow: items 3, 6, 6 -> mean 5, std sqrt((4 + 1 + 1) / 2) = sqrt(3).
    assert (wh["mean"], wh["std"], wh["n"], wh["n_scores"]) == pytest.approx((5.0, np.sqrt(3), 3, 4))
    assert wh["counts"] == {"1": 0, "2": 1, "3": 0, "4": 1, "5": 0, "6": 2}
    assert 3 <= se["ci"][0] <= 4 <= se["ci"][1] <= 5
    out = capsys.readouterr().out
    assert "4.00" in out and "5.00" in out
    import matplotlib.image
    assert matplotlib.image.imread(out_png).ndim == 3


PREF = {"prompt_id": 1, "model_a": "LIMA", "model_b": "GPT-4", "annotator": "u", "preference": "a"}


@pytest.mark.parametrize("command, lines, message", [
    ("preferences", [PREF, "{not json"], ":2: not JSON"),
    ("preferences", ["[1, 2]"], ":1: expected a JSON object, got list"),
    ("preferences", [{k: v for k, v in PREF.items() if k != "annotator"}], ':1: missing "annotator"'),
    ("preferences", [{**PREF, "preference": "A"}], ':1: bad preference "A"'),
    ("preferences", [{**PREF, "model_b": "LIMA"}], ':1: the same model "LIMA" on both sides'),
    ("preferences", [PREF, {**PREF, "model_a": "BARD"}], ':2: --model "LIMA" is neither model_a ("BARD") nor model_b'),
    ("preferences", [PREF, {**PREF, "model_a": "GPT-4", "model_b": "LIMA"}],
     ':2: annotator "u" already judged prompt 1 of LIMA vs GPT-4 (line 1)'),
    ("preferences", [{**PREF, "prompt_id": None}], ':1: "prompt_id" must be a string or an integer, got null'),
    ("preferences", [], ": no annotations"),
    ("audit", [{"prompt_id": 1, "label": "good"}], ':1: bad label "good"'),
    ("audit", [{"prompt_id": 1, "label": "pass", "model": "a"}, {"prompt_id": 2, "label": "pass"}],
     ':2: earlier lines name "model", this one names none'),
    ("likert", [{"prompt_id": 1, "score": 7}], ":1: score 7 is outside 1-6"),
    ("likert", [{"prompt_id": 1, "score": "5"}], ':1: "score" must be an integer from 1 to 6, got "5"'),
    ("likert", [{"prompt_id": 1, "score": 4.5}], ':1: "score" must be an integer from 1 to 6, got 4.5'),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, command, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    out_json = str(tmp_path / "out.json")
    argv = [command, path, "--json", out_json] + (["--model", "LIMA"] if command == "preferences" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lima-report: error: {path}{message}")
    assert not os.path.exists(out_json)


def test_missing_file(tmp_path, capsys):
    assert main(["likert", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"lima-report: error: {tmp_path / 'nope.jsonl'}: cannot read")


def test_templates(capsys):
    pairwise = report.load_template("pairwise")
    filled = pairwise.format(prompt="PROMPT-TEXT", response_a="ANSWER-ONE", response_b="ANSWER-TWO")
    assert filled.index("PROMPT-TEXT") < filled.index("ANSWER-ONE") < filled.index("ANSWER-TWO")
    assert "Preference: tie" in filled
    likert = report.load_template("likert")
    filled = likert.format(prompt="PROMPT-TEXT", response="THE-ANSWER")
    assert "THE-ANSWER" in filled and "1 to 6" in filled and "{" not in filled
    assert main(["template", "likert"]) == 0
    assert capsys.readouterr().out == likert.rstrip("\n") + "\n"
    with pytest.raises(ValueError, match="unknown template"):
        report.load_template("rubric")


def test_templates_ship_as_package_data():
    # setup.py's package_data "*.txt" reaches only packages that find_packages lists.
    from setuptools import find_packages
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert "lima_jax.judge_templates" in find_packages(root, include=["lima_jax", "lima_jax.*"])
