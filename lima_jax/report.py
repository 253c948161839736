"""Evaluation reports like LIMA's, from users' own annotation JSONL: pairwise preferences (Figure 1),
the Fail/Pass/Excellent audit (Figure 3) and 1-6 Likert helpfulness (§5) -- statistics, tables, plots.

Counting rule, shared by all three: an *item* (one prompt, for one comparison or one model) counts
once; when k annotators labeled it, each label weighs 1/k (Likert: the item's score is the mean of
its k scores). Confidence intervals are 95% percentile bootstraps that resample items.

Agreement (preferences only) is the paper's tie-discounted accuracy: for two annotators of the same
item, 1 point if they agree, 0.5 if exactly one of them said tie, 0 otherwise. It is averaged over
all annotator pairs of all items with >= 2 annotators, pooled across opponents (an item with 3
annotators contributes 3 pairs), after turning every label into the reported model's view.
"""
from __future__ import annotations

import json
import os
import zlib
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from lima_jax.atomic import atomic_write, atomic_write_text
from lima_jax.jsonl import parse_object

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTCOMES = ("win", "tie", "loss")  # from the reported model's side
AUDIT_LABELS = ("fail", "pass", "excellent")
LIKERT_SCORES = range(1, 7)
TEMPLATES = ("pairwise", "likert")


class ReportInputError(ValueError):
    """A bad input line or file; str() is `FILE:LINE: what is wrong` (or `FILE: ...`)."""


# ----------------------------------------------------------------------------- reading

def _read_jsonl(path: str):
    """(line number, object) for each non-blank line; not-JSON and non-object lines raise."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ReportInputError(f"{path}: cannot read ({e.strerror})") from None
    seen = False
    with f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = parse_object(text)
            except ValueError as e:
                raise ReportInputError(f"{path}:{lineno}: {e}") from None
            seen = True
            yield lineno, row
    if not seen:
        raise ReportInputError(f"{path}: no annotations (the file is empty)")


def _field(row, name, path, lineno, kinds=(str,), what="a non-empty string"):
    """row[name], checked: present, of one of `kinds`, not a bool, not an empty string."""
    if name not in row:
        raise ReportInputError(f'{path}:{lineno}: missing "{name}"')
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        raise ReportInputError(f'{path}:{lineno}: "{name}" must be {what}, got {json.dumps(value)}')
    return value


def _prompt_id(row, path, lineno) -> str:
    # Ids may be numbers or strings; both name the same prompt when printed alike.
    return str(_field(row, "prompt_id", path, lineno, (str, int), "a string or an integer"))


def read_preferences(path: str, model: str) -> dict:
    """{opponent: {prompt_id: {annotator: outcome}}}, outcomes from `model`'s side, opponents in
    order of first appearance. Positions (a/b) are undone here, so nothing later sees them."""
    items: dict = {}
    first_line: dict = {}  # (opponent, prompt_id, annotator) -> line, to name duplicates
    for lineno, row in _read_jsonl(path):
        prompt_id = _prompt_id(row, path, lineno)
        a = _field(row, "model_a", path, lineno)
        b = _field(row, "model_b", path, lineno)
        annotator = str(_field(row, "annotator", path, lineno, (str, int), "a string or an integer"))
        pref = _field(row, "preference", path, lineno, (str,), '"a", "b" or "tie"')
        if pref not in ("a", "b", "tie"):
            raise ReportInputError(f'{path}:{lineno}: bad preference {json.dumps(pref)}; expected "a", "b" or "tie"')
        if a == b:
            raise ReportInputError(f'{path}:{lineno}: the same model "{a}" on both sides')
        if model not in (a, b):
            raise ReportInputError(f'{path}:{lineno}: --model "{model}" is neither model_a ("{a}") nor model_b ("{b}")')
        ours, opponent = ("a", b) if a == model else ("b", a)
        outcome = "tie" if pref == "tie" else ("win" if pref == ours else "loss")
        key = (opponent, prompt_id, annotator)
        if key in first_line:
            raise ReportInputError(f'{path}:{lineno}: annotator "{annotator}" already judged prompt {prompt_id} '
                                   f'of {model} vs {opponent} (line {first_line[key]})')
        first_line[key] = lineno
        items.setdefault(opponent, {}).setdefault(prompt_id, {})[annotator] = outcome
    return items


def _group(row, fields, path, lineno, expected):
    """The group name of a line (its `fields` joined by " / ", or "all"); every line must name the
    same fields as the first one, so a forgotten field is an error rather than a silent new group."""
    present = tuple(f for f in fields if f in row)
    if expected is not None and present != expected:
        want = " and ".join(f'"{f}"' for f in expected) or "no " + " or ".join(f'"{f}"' for f in fields)
        have = " and ".join(f'"{f}"' for f in present) or "none"
        raise ReportInputError(f"{path}:{lineno}: earlier lines name {want}, this one names {have}")
    name = " / ".join(str(_field(row, f, path, lineno, (str, int), "a string or an integer")) for f in present)
    return present, name or "all"


def _read_judgements(path: str, field: str, kinds: tuple, what: str, allowed, not_allowed, group_fields) -> dict:
    """{group: {prompt_id: [value, ...]}} from lines {prompt_id, <field>, <group_fields>?}: each value
    of one of `kinds` (else "must be <what>") and in `allowed` (else `not_allowed(value)`)."""
    groups: dict = {}
    expected = None
    for lineno, row in _read_jsonl(path):
        prompt_id = _prompt_id(row, path, lineno)
        value = _field(row, field, path, lineno, kinds, what)
        if value not in allowed:
            raise ReportInputError(f"{path}:{lineno}: {not_allowed(value)}")
        expected, name = _group(row, group_fields, path, lineno, expected)
        groups.setdefault(name, {}).setdefault(prompt_id, []).append(value)
    return groups


def read_audit(path: str) -> dict:
    """{group: {prompt_id: [label, ...]}} from lines {prompt_id, label, model?}."""
    labels = '"fail", "pass" or "excellent"'
    return _read_judgements(path, "label", (str,), labels, AUDIT_LABELS,
                            lambda v: f"bad label {json.dumps(v)}; expected {labels}", ("model",))


def read_likert(path: str) -> dict:
    """{group: {prompt_id: [score, ...]}} from lines {prompt_id, score 1-6, model? condition?}."""
    return _read_judgements(path, "score", (int,), "an integer from 1 to 6", LIKERT_SCORES,
                            lambda v: f"score {v} is outside 1-6", ("model", "condition"))


# ----------------------------------------------------------------------------- statistics

def label_rows(items, labels) -> np.ndarray:
    """[n_items, len(labels)]: each item's label distribution, its k labels weighing 1/k each."""
    rows = np.zeros((len(items), len(labels)))
    for i, item in enumerate(items):
        for label in item:
            rows[i, labels.index(label)] += 1.0 / len(item)
    return rows


def bootstrap_ci(values: np.ndarray, n_bootstrap: int, seed: int, name: str = "") -> np.ndarray:
    """[2, ...] 95% percentile interval of the mean over axis 0, resampling rows (items).
    The generator is seeded by (seed, name) so one group's interval does not depend on the others."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    idx = rng.integers(0, len(values), size=(n_bootstrap, len(values)))
    means = values[idx].mean(axis=1)
    return np.percentile(means, [2.5, 97.5], axis=0)


def tie_discounted(x: str, y: str) -> float:
    """The paper's agreement points for two labels of one item."""
    if x == y:
        return 1.0
    return 0.5 if "tie" in (x, y) else 0.0


def agreement(items: dict) -> dict:
    """Tie-discounted accuracy pooled over all annotator pairs of all items with >= 2 annotators."""
    points, pairs, n_items = 0.0, 0, 0
    for per_prompt in items.values():
        for by_annotator in per_prompt.values():
            labels = list(by_annotator.values())
            if len(labels) < 2:
                continue
            n_items += 1
            for i in range(len(labels)):
                for j in range(i + 1, len(labels)):
                    points += tie_discounted(labels[i], labels[j])
                    pairs += 1
    return {"tie_discounted": points / pairs if pairs else None, "n_items": n_items, "n_pairs": pairs}


def _categorical(items_by_group: dict, labels, n_bootstrap: int, seed: int) -> dict:
    out = {}
    for name, per_prompt in items_by_group.items():
        items = list(per_prompt.values())
        rows = label_rows(items, labels)
        ci = bootstrap_ci(rows, n_bootstrap, seed, name)
        out[name] = {**{lab: float(f) for lab, f in zip(labels, rows.mean(axis=0))},
                     "n": len(items), "n_labels": sum(len(it) for it in items),
                     "ci": {lab: [float(ci[0, j]), float(ci[1, j])] for j, lab in enumerate(labels)}}
    return out


def preference_report(items: dict, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The JSON report: {"vs": {opponent: {win, tie, loss, n, n_labels, ci}}, "agreement": {...}}."""
    per_prompt = {opp: {p: list(a.values()) for p, a in prompts.items()} for opp, prompts in items.items()}
    return {"vs": _categorical(per_prompt, OUTCOMES, n_bootstrap, seed), "agreement": agreement(items)}


def audit_report(groups: dict, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{"groups": {group: {fail, pass, excellent, n, n_labels, ci}}}."""
    return {"groups": _categorical(groups, AUDIT_LABELS, n_bootstrap, seed)}


def likert_report(groups: dict, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{"groups": {group: {mean, std, n, n_scores, ci, counts}}}; std is over items (ddof=1)."""
    out = {}
    for name, per_prompt in groups.items():
        scores = np.array([np.mean(s) for s in per_prompt.values()])
        ci = bootstrap_ci(scores, n_bootstrap, seed, name)
        every = [s for item in per_prompt.values() for s in item]
        out[name] = {"mean": float(scores.mean()),
                     "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                     "n": len(scores), "n_scores": len(every), "ci": [float(ci[0]), float(ci[1])],
                     "counts": {str(s): every.count(s) for s in LIKERT_SCORES}}
    return {"groups": out}


# ----------------------------------------------------------------------------- tables

def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _ci(lo_hi) -> str:
    return f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def preferences_table(report: dict, model: str) -> str:
    width = max([len("opponent")] + [len(o) for o in report["vs"]])
    lines = [f"{'opponent':<{width}}  {'n':>5}  {model + ' wins':>22}  {'tie':>22}  {model + ' loses':>22}"]
    for opp, r in report["vs"].items():
        cells = "  ".join(f"{_pct(r[o]) + ' ' + _ci(r['ci'][o]):>22}" for o in OUTCOMES)
        lines.append(f"{opp:<{width}}  {r['n']:>5}  {cells}")
    agr = report["agreement"]
    value = "n/a" if agr["tie_discounted"] is None else f"{100 * agr['tie_discounted']:.1f}%"
    lines.append(f"tie-discounted agreement: {value} over {agr['n_items']} items with >= 2 annotators "
                 f"({agr['n_pairs']} annotator pairs)")
    lines.append("fractions weigh each item once (k labels: 1/k each); brackets: 95% bootstrap intervals")
    return "\n".join(lines)


def audit_table(report: dict) -> str:
    groups = report["groups"]
    width = max([len("model")] + [len(g) for g in groups])
    lines = [f"{'model':<{width}}  {'n':>5}  " + "  ".join(f"{lab:>20}" for lab in AUDIT_LABELS)]
    for name, r in groups.items():
        cells = "  ".join(f"{_pct(r[lab]) + ' ' + _ci(r['ci'][lab]):>20}" for lab in AUDIT_LABELS)
        lines.append(f"{name:<{width}}  {r['n']:>5}  {cells}")
    lines.append("fractions weigh each prompt once (k labels: 1/k each); brackets: 95% bootstrap intervals")
    return "\n".join(lines)


def likert_table(report: dict) -> str:
    groups = report["groups"]
    width = max([len("model / condition")] + [len(g) for g in groups])
    lines = [f"{'model / condition':<{width}}  {'n':>5}  {'mean':>5}  {'std':>5}  {'95% CI':>13}  counts 1..6"]
    for name, r in groups.items():
        counts = " ".join(f"{r['counts'][str(s)]}" for s in LIKERT_SCORES)
        lines.append(f"{name:<{width}}  {r['n']:>5}  {r['mean']:5.2f}  {r['std']:5.2f}  "
                     f"{'[%.2f, %.2f]' % tuple(r['ci']):>13}  {counts}")
    lines.append("each prompt counts once (the mean of its scores); CI: 95% bootstrap over prompts")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    # A bare Figure (no pyplot) draws with Agg and leaves no global backend or figure state behind.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _stacked_bars(ax, names, fractions, segment_labels, colors):
    """Horizontal bars, first name on top, each split into segments with their percentages."""
    y = np.arange(len(names))[::-1]
    left = np.zeros(len(names))
    for j, (label, color) in enumerate(zip(segment_labels, colors)):
        widths = np.array([f[j] for f in fractions])
        ax.barh(y, widths, left=left, color=color, label=label)
        for yi, l, w in zip(y, left, widths):
            if w >= 0.04:
                ax.text(l + w / 2, yi, f"{100 * w:.0f}%", ha="center", va="center", fontsize=9)
        left += widths
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")


def plot_preferences(report: dict, model: str, path: str) -> "Figure":
    """Figure 1 style: one bar per opponent, segments `<model> wins` / Tie / `<opponent> wins`."""
    names = list(report["vs"])
    fig = _figure(8, 0.6 * len(names) + 1.4)
    ax = fig.add_subplot()
    fractions = [[report["vs"][n][o] for o in OUTCOMES] for n in names]
    _stacked_bars(ax, names, fractions, [f"{model} wins", "Tie", "opponent wins"],
                  ["#6aa84f", "#cccccc", "#e06666"])
    # The right segment is named on each bar's right edge, as the figure reads "<opponent> wins".
    for yi, n in zip(np.arange(len(names))[::-1], names):
        ax.text(1.01, yi, f"{n} wins", va="center", fontsize=8)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    return _savefig(fig, path)


def plot_audit(report: dict, path: str) -> "Figure":
    """Figure 3 style: Fail / Pass / Excellent percentages, one bar per model in each group."""
    groups = report["groups"]
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(AUDIT_LABELS))
    width = 0.8 / len(groups)
    for i, (name, r) in enumerate(groups.items()):
        values = [r[lab] for lab in AUDIT_LABELS]
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, [f"{100 * v:.0f}%" for v in values], fontsize=8)
    ax.set_xticks(x, [lab.capitalize() for lab in AUDIT_LABELS])
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    if len(groups) > 1:
        ax.legend(frameon=False)
    return _savefig(fig, path)


def plot_likert(report: dict, path: str) -> "Figure":
    """Mean helpfulness per model / condition with 95% bootstrap intervals, like §5's figures."""
    groups = report["groups"]
    names = list(groups)
    means = np.array([groups[n]["mean"] for n in names])
    ci = np.array([groups[n]["ci"] for n in names])
    fig = _figure(max(4, 1.1 * len(names) + 2), 3.6)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(names)), means, yerr=[means - ci[:, 0], ci[:, 1] - means], capsize=4, color="#6fa8dc")
    tilt = len(names) > 4  # long condition names overlap when many
    ax.set_xticks(np.arange(len(names)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylim(1, 6)
    ax.set_ylabel("helpfulness (1-6)")
    return _savefig(fig, path)


# ----------------------------------------------------------------------------- outputs

def _savefig(fig, path: str):
    """Save atomically; returns the figure so callers (and tests) can inspect what was drawn."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150))
    return fig


def write_json(obj, path: str) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def load_template(name: str) -> str:
    """The judge prompt template `pairwise` ({prompt}, {response_a}, {response_b}) or `likert`
    ({prompt}, {response}); fill it with str.format."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return resources.files("lima_jax.judge_templates").joinpath(f"{name}.txt").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- commands

def _publish(report: dict, json_path, plot_path, plot, table) -> str:
    """Writes the optional JSON and plot (`plot(report, path)`); returns `table(report)` to print."""
    if json_path:
        write_json(report, json_path)
    if plot_path:
        plot(report, plot_path)
    return table(report)


def run_preferences(path, model, json_path=None, plot_path=None, n_bootstrap=1000, seed=0) -> str:
    """Read, report, write the optional JSON and plot; returns the table to print."""
    report = preference_report(read_preferences(path, model), n_bootstrap, seed)
    return _publish(report, json_path, plot_path, lambda r, p: plot_preferences(r, model, p),
                    lambda r: preferences_table(r, model))


def run_audit(path, json_path=None, plot_path=None, n_bootstrap=1000, seed=0) -> str:
    return _publish(audit_report(read_audit(path), n_bootstrap, seed), json_path, plot_path, plot_audit, audit_table)


def run_likert(path, json_path=None, plot_path=None, n_bootstrap=1000, seed=0) -> str:
    return _publish(likert_report(read_likert(path), n_bootstrap, seed), json_path, plot_path, plot_likert,
                    likert_table)
