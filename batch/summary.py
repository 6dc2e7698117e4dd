"""The end-of-job summary: rows, tokens, cost per model, speed and latency.

Rows whose answer carried no usage (several local servers never send it, even
when asked) are counted and said to be of unknown cost: a job without any usage
shows its tokens and cost as unknown (null in the JSON), never as zero.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch._startup import compute
from batch.records import Result
from batch.store.atomic import atomic_write

__all__ = ["ModelTotals", "Summary", "percentile", "percentiles"]

# up to this many latencies a Python sort is as quick, and a small job never
# loads pyarrow.compute (see batch._startup.compute)
_FEW_FOR_PYTHON = 65_536


def percentile(values: array[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    return percentiles(values, (q,))[0]


def percentiles(values: array[float], qs: tuple[float, ...]) -> list[float | None]:
    """Several nearest-rank percentiles, selected by Arrow (one copy of the values, no sort, no float objects)."""
    n = len(values)
    if n == 0:
        return [None for _ in qs]
    ranks = [min(max(1, round(q / 100 * n + 0.5 - 1e-9)), n) for q in qs]
    if n <= _FEW_FOR_PYTHON:
        ordered = sorted(values)
        return [ordered[r - 1] for r in ranks]
    pc = compute()

    arr = pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(values)])
    # the nearest rank r is the value at sorted position r - 1: ask for exactly that position
    found = pc.quantile(arr, q=[(r - 1) / (n - 1) for r in ranks], interpolation="nearest")
    return list(found.to_pylist())


@dataclass(slots=True)
class ModelTotals:
    rows_ok: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    rows_unpriced: int = 0  # ok rows with usage but no price for their model
    rows_without_usage: int = 0  # ok rows whose answer carried no usage

    def as_dict(self) -> dict[str, Any]:
        """Tokens are None when no row reported usage, cost when no row has a known cost."""
        no_tokens = self.rows_without_usage == self.rows_ok > 0
        no_cost = self.rows_without_usage + self.rows_unpriced == self.rows_ok > 0
        return {
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "prompt_tokens": None if no_tokens else self.prompt_tokens,
            "completion_tokens": None if no_tokens else self.completion_tokens,
            "cached_tokens": None if no_tokens else self.cached_tokens,
            "reasoning_tokens": None if no_tokens else self.reasoning_tokens,
            "cost_usd": None if no_cost else round(self.cost_usd, 8),
            "rows_unpriced": self.rows_unpriced,
            "rows_without_usage": self.rows_without_usage,
        }


@dataclass(slots=True)
class Summary:
    """Accumulates this run's results; cheap per row (a few additions and one float kept)."""

    job: str
    output: str
    rows_skipped: int = 0
    rows_failed_kept: int = 0  # of rows_skipped: rows that failed before, kept by --no-retry-failed
    models: dict[str, ModelTotals] = field(default_factory=dict)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    wall_s: float = 0.0
    stopped: str | None = None  # why the job ended early, if it did
    errors: dict[str, int] = field(default_factory=dict)
    # structured output, per variant: [rows asked again after an answer broke the schema, rows never valid]
    structured: dict[str, list[int]] = field(default_factory=dict)
    budget: dict[str, Any] | None = None  # with a budget: batch.budget.Ledger.as_dict()
    # a sweep or a scored job: each variant's numbers over the whole output, and its lines (batch.variant_summary)
    variant_report: list[dict[str, Any]] | None = None
    variant_lines: list[str] = field(default_factory=list)
    by_variant: bool = False  # a sweep: this run's totals per variant too
    variants: dict[str, ModelTotals] = field(default_factory=dict)
    # with output.format = "openai_batch": the batch output file (and the error file) written from ``output``
    batch_files: list[str] = field(default_factory=list)
    _p50_p95: tuple[int, list[float | None]] | None = field(default=None, init=False, repr=False, compare=False)

    def add(self, r: Result) -> None:
        totals = self.models.get(r.model)
        if totals is None:
            totals = self.models[r.model] = ModelTotals()
        self._count(totals, r)
        if r.status != "ok":
            key = r.error_code or (str(r.http_status) if r.http_status else "error")
            self.errors[key] = self.errors.get(key, 0) + 1
        if self.by_variant and r.variant is not None:
            per = self.variants.get(r.variant)
            if per is None:
                per = self.variants[r.variant] = ModelTotals()
            self._count(per, r)
        if r.latency_s is not None and r.status == "ok":
            self.latencies.append(r.latency_s)
        if r.columns is not None:
            counts = self.structured.setdefault(r.variant or r.model, [0, 0])  # a plain job: its one variant, its model
            counts[0] += r.invalid_answers > 0
            counts[1] += r.status == "failed" and r.error_code == "invalid_output"

    @staticmethod
    def _count(totals: ModelTotals, r: Result) -> None:
        if r.status == "ok":
            totals.rows_ok += 1
        else:
            totals.rows_failed += 1
        if r.prompt_tokens is not None:
            totals.prompt_tokens += r.prompt_tokens
            totals.completion_tokens += r.completion_tokens or 0
            totals.cached_tokens += r.cached_tokens or 0
            totals.reasoning_tokens += r.reasoning_tokens or 0
            if r.cost_usd is None:
                totals.rows_unpriced += 1
            else:
                totals.cost_usd += r.cost_usd
        elif r.status == "ok":
            totals.rows_without_usage += 1

    @property
    def rows_ok(self) -> int:
        return sum(t.rows_ok for t in self.models.values())

    @property
    def rows_failed(self) -> int:
        return sum(t.rows_failed for t in self.models.values())

    def total(self) -> ModelTotals:
        t = ModelTotals()
        for m in self.models.values():
            for name in ModelTotals.__slots__:
                setattr(t, name, getattr(t, name) + getattr(m, name))
        return t

    def as_dict(self) -> dict[str, Any]:
        done = self.rows_ok + self.rows_failed
        if self._p50_p95 is None or self._p50_p95[0] != len(self.latencies):
            self._p50_p95 = (len(self.latencies), percentiles(self.latencies, (50, 95)))
        p50, p95 = self._p50_p95[1]
        return {
            "job": self.job,
            "output": self.output,
            "batch_files": self.batch_files,
            "stopped": self.stopped,
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "rows_skipped": self.rows_skipped,
            "rows_failed_kept": self.rows_failed_kept,
            "totals": self.total().as_dict(),
            "models": {name: t.as_dict() for name, t in sorted(self.models.items())},
            "errors": dict(sorted(self.errors.items())),
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": round(done / self.wall_s, 2) if self.wall_s > 0 else None,
            "latency_p50_s": None if p50 is None else round(p50, 4),
            "latency_p95_s": None if p95 is None else round(p95, 4),
            **({"structured": {name: {"rows_reasked": c[0], "rows_never_valid": c[1]}
                               for name, c in sorted(self.structured.items())}} if self.structured else {}),
            "budget": self.budget,
            **({"variants": variants} if (variants := self._variants_section()) is not None else {}),
        }

    def _variants_section(self) -> list[dict[str, Any]] | None:
        """One entry a variant: the whole output's figures (the report's, ``variant_report``), and
        under ``this_run`` the totals of the rows this run wrote (a sweep); None for a plain job."""
        if self.variant_report is None and not self.by_variant:
            return None
        entries = [dict(e) for e in self.variant_report or []]
        known = {e["name"]: e for e in entries}
        for name, totals in self.variants.items():
            entry = known.get(name)
            if entry is None:
                entry = known[name] = {"name": name}
                entries.append(entry)
            entry["this_run"] = totals.as_dict()
        return entries

    def to_json(self) -> bytes:
        return (json.dumps(self.as_dict(), indent=2) + "\n").encode()

    def write_json(self, path: Path) -> None:
        atomic_write(path, self.to_json())

    def render(self) -> str:
        """The summary as a few aligned lines of text."""
        d = self.as_dict()
        t = d["totals"]
        lines = []
        head = f"promptmill: job '{self.job}'"
        if self.stopped:
            budget = self.budget is not None and self.budget["reached"]
            head += f" stopped: {self.stopped}" if budget else f" stopped early: {self.stopped}"
        lines.append(head)
        lines.append(
            f"  rows      {d['rows_ok']:,} ok, {d['rows_failed']:,} failed"
            + (f", {d['rows_skipped']:,} already done (skipped)" if d["rows_skipped"] else "")
            + (f", of which {d['rows_failed_kept']:,} failed earlier and were kept (--no-retry-failed)"
               if d["rows_failed_kept"] else "")
        )
        if t["prompt_tokens"] is None:
            lines.append(f"  tokens    unknown: the server reported no usage for any of the {d['rows_ok']:,} ok rows")
        else:
            lines.append(
                f"  tokens    {t['prompt_tokens']:,} in ({t['cached_tokens']:,} cached), "
                f"{t['completion_tokens']:,} out ({t['reasoning_tokens']:,} reasoning)"
                + (f"; {t['rows_without_usage']:,} rows reported no usage" if t["rows_without_usage"] else "")
            )
        for name, m in d["models"].items():
            lines.append(f"  cost      {_cost_text(m)}  {name}")
        for v in d.get("variants", []):
            if "this_run" in v:
                lines.append(f"  cost      {_cost_text(v['this_run'])}  variant {v['name']}")
        if len(d["models"]) > 1:
            lines.append(f"  cost      {_cost_text(t)}  total")
        if self.budget is not None:
            lines.append(f"  budget    {_budget_text(self.budget)}")
        rate = d["rows_per_s"]
        lines.append(f"  time      {d['wall_s']:.1f} s wall, {rate if rate is not None else 0:,.1f} rows/s")
        if d["latency_p50_s"] is not None:
            lines.append(f"  latency   p50 {d['latency_p50_s']:.3f} s, p95 {d['latency_p95_s']:.3f} s")
        for name, c in d.get("structured", {}).items():
            lines.append(f"  schema    {c['rows_reasked']:,} rows asked again, {c['rows_never_valid']:,} never valid  {name}")
        if d["errors"]:
            errs = ", ".join(f"{k}: {v:,}" for k, v in d["errors"].items())
            lines.append(f"  failures  {errs}")
        lines += self.variant_lines
        if self.batch_files:
            errors = f", failed lines in {self.batch_files[1]}" if len(self.batch_files) > 1 else ""
            lines.append(f"  output    {self.batch_files[0]}{errors} (from the Parquet store {self.output})")
        else:
            lines.append(f"  output    {self.output}")
        return "\n".join(lines)


def _budget_text(b: dict[str, Any]) -> str:
    """``$X of $Y spent (...)``: the output's whole cost against the budget, and what is counted at its worst case."""
    text = f"${b['spent_usd']:.6f} of ${b['budget_usd']:.6f} spent"
    if b["spent_before_usd"]:
        text += f" (${b['spent_before_usd']:.6f} by earlier runs)"
    if b["per_variant"]:
        text += ", an equal share a variant"
    if b["rows_without_usage"]:
        text += (f"; {b['rows_without_usage']:,} rows without usage counted at their reservation "
                 f"(${b['without_usage_usd']:.6f}, the worst case)")
    return text


def _cost_text(totals: dict[str, Any]) -> str:
    """``$X``, ``$X + N rows of unknown cost (why)`` or ``unknown (why)``."""
    no_usage, unpriced = totals["rows_without_usage"], totals["rows_unpriced"]
    why = []
    if no_usage:
        why.append(f"{no_usage:,} rows without usage")
    if unpriced:
        why.append(f"{unpriced:,} rows with no price")
    if totals["cost_usd"] is None:
        return f"unknown ({', '.join(why)})"
    known = f"${totals['cost_usd']:.6f}"
    return f"{known} + {no_usage + unpriced:,} rows of unknown cost ({', '.join(why)})" if why else known
