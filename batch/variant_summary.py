"""The end of a sweep: each variant's numbers and its comparison with the baseline.

Computed once the output is assembled, from the whole output (earlier runs' rows
included), by the report's data layer (:func:`batch.report.load` and
:func:`batch.report.summarize`): the summary and ``promptmill report`` never disagree
on what they count. The summary draws fewer bootstrap resamples than the report
(:data:`RESAMPLES`; 4 variants x 5,000 rows x 2 samples with two scores take about a
second); the draws are seeded, so the same output gives the same intervals, and
they may differ from the report's in the third digit.

:func:`section` gives the summary JSON's ``variants`` list; :func:`text` the lines
printed under the run's summary: the report's Summary and Scores tables aligned
as text, then one sentence per variant and score against the baseline, e.g.
``B is 3.0 points better than A on correct (95% CI 1.2 to 4.8) at 1.80x the cost;
beyond noise``. Pass/fail scores (every answer 0 or 1) speak in percentage points,
other scores in their own units.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from batch.errors import PromptmillError
from batch.report import ReportData, Table, VariantSummary, load, summarize, tables

__all__ = ["RESAMPLES", "comparison", "section", "text"]

log = logging.getLogger(__name__)

RESAMPLES = 500


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def _pass_fail(data: ReportData, score: str) -> bool:
    """Every answer of every variant scored 0 or 1: a rate, spoken of in points."""
    return all(s in (0.0, 1.0) for v in data.variants for s in v.column("score_" + score) if s is not None)


def comparison(s: VariantSummary, baseline: str, score: str | None, points: bool) -> str:
    """One sentence: ``s`` against the baseline on ``score`` (None: on cost alone)."""
    cost = "at an unknown cost ratio" if s.cost_ratio is None else f"at {s.cost_ratio:.2f}x the cost"
    if score is None:
        return f"{s.name} against {baseline}: no scores, {cost}"
    d = s.diffs[score]
    if d.n == 0:
        return f"{s.name} against {baseline} on {score}: no rows both answered, {cost}"
    scale, unit = (100.0, " points") if points else (1.0, "")
    diff, low, high = d.diff * scale, d.low * scale, d.high * scale
    digits = 1 if points else 3
    if round(diff, digits) == 0:
        head = f"{s.name} is level with {baseline} on {score}"
    else:
        head = (f"{s.name} is {abs(diff):.{digits}f}{unit} {'better' if diff > 0 else 'worse'} "
                f"than {baseline} on {score}")
    noise = "within noise" if low <= 0 <= high else "beyond noise"
    return f"{head} (95% CI {low:.{digits}f} to {high:.{digits}f}) {cost}; {noise} (n={d.n} rows)"


def section(path: Path, resamples: int = RESAMPLES) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``variants`` section of the summary JSON and its text lines, from the output at ``path``.

    An output that cannot be read gives nothing (logged): the run itself is done.
    """
    try:
        data = load(path)
    except PromptmillError as exc:
        log.warning("no summary per variant: %s", exc)
        return [], []
    summaries = summarize(data, resamples)
    points = {score: _pass_fail(data, score) for score in data.scores}
    out = []
    for s in summaries:
        entry: dict[str, Any] = {
            "name": s.name,
            "baseline": s.name == data.baseline,
            "rows_ok": s.rows_ok,
            "rows_failed": s.rows_failed,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "cost_usd": _round(s.cost_usd, 8),
            "cost_per_1k_rows_usd": _round(s.cost_per_1k, 8),
            "latency_p50_s": _round(s.latency_p50, 4),
            "latency_p95_s": _round(s.latency_p95, 4),
            "ttft_p50_s": _round(s.ttft_p50, 4),
            "output_tokens_per_s": _round(s.output_tps, 2),
            "scores": {name: {"mean": _round(st.mean), "ci95": [_round(st.low), _round(st.high)], "n": st.n}
                       for name, st in s.scores.items()},
        }
        if s.name != data.baseline:
            entry["vs_baseline"] = {
                "cost_ratio": _round(s.cost_ratio, 4),
                "scores": {name: {"diff": _round(d.diff), "ci95": [_round(d.low), _round(d.high)], "n": d.n,
                                  "p_value": _round(d.p_value), "method": d.method,
                                  "beyond_noise": None if d.n == 0 else not d.low <= 0 <= d.high}
                           for name, d in s.diffs.items()},
                "lines": [comparison(s, data.baseline, name, points[name]) for name in data.scores]
                or [comparison(s, data.baseline, None, False)],
            }
        out.append(entry)
    return out, text(data, summaries, out)


def _aligned(t: Table) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in t.rows)) for i, h in enumerate(t.headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < t.text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return ["    " + line(t.headers), *("    " + line(r) for r in t.rows)]


def text(data: ReportData, summaries: list[VariantSummary], entries: list[dict[str, Any]]) -> list[str]:
    """The lines printed under the run's summary."""
    lines = [f"  variants  {len(summaries)}, baseline {data.baseline} (the whole output, earlier runs included)"]
    for t in tables(data, summaries):
        if t.title in ("Summary", "Scores"):
            lines += _aligned(t)
    for e in entries:
        lines += [f"  vs base   {line}" for line in e.get("vs_baseline", {}).get("lines", [])]
    return lines
