"""``promptmill report``: an output's variants side by side, as Markdown or one HTML page.

Works on any output, sweep or not. Every sweep column is optional: without
``variant`` the rows are one variant named after their model, without
``finished_at`` the time a row finished is its ``created``, and without
``score_<name>`` columns there are no scores. The statistics (intervals, paired
differences, percentiles) come from :mod:`batch.stats`; this module only reads
the output, groups it per variant and lays the numbers out in tables, which
both formats share. The plots are in :mod:`batch.report_html`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import InputError, OutputError, UsageError
from batch.stats import PairedDiff, mean_ci, paired_diff, percentile, wilson
from batch.store.atomic import atomic_write
from batch.structured import INVALID_COLUMN

__all__ = ["ReportData", "Table", "Variant", "VariantSummary", "load", "render", "save", "summarize", "tables"]

_METADATA_KEY = b"promptmill.job"  # as batch.store writes it
_SCORE_PREFIX = "score_"
# the columns a report reads (the answers' text is never loaded)
_COLUMNS = (
    "id", "model", "status", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s", "ttft_s",
    "http_status", "error_code", "created", "variant", "sample", "params", "finished_at", INVALID_COLUMN,
)


@dataclass(slots=True)
class Variant:
    """One variant's rows: ``columns[name][i]`` is row i's value (None when missing)."""

    name: str
    params: dict[str, Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        return self.columns.get(name) or [None] * len(self.columns["id"])

    def __len__(self) -> int:
        return len(self.columns["id"])


@dataclass(slots=True)
class ReportData:
    path: Path
    job: dict[str, Any]  # the output's promptmill.job metadata
    variants: list[Variant]
    baseline: str
    scores: list[str]  # score names, without the score_ prefix
    time_column: str | None  # finished_at, else created, else None


def load(path: Path) -> ReportData:
    """Read an output and group its rows per variant; InputError when it is not a promptmill output."""
    if not path.is_file():
        raise InputError("no such file" if not path.exists() else "not a file", path=path)
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", path=path) from None
    raw = meta.get(_METADATA_KEY)
    try:
        job = json.loads(raw) if raw else None
    except ValueError:
        job = None
    names = pf.schema_arrow.names
    if not isinstance(job, dict) or "id" not in names or "status" not in names:
        raise InputError("not a promptmill output (no promptmill.job metadata, or no id and status columns)", path=path)
    scores = [n for n in names if n.startswith(_SCORE_PREFIX)]
    try:
        table = pf.read(columns=[c for c in _COLUMNS if c in names] + scores)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read the output ({exc})", path=path) from None
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    key = "variant" if "variant" in columns else "model"
    listed = {str(v.get("name")): v for v in job.get("variants") or [] if isinstance(v, dict)}
    # variants in the job's order, then any others in the order they first appear
    order = list(listed)
    groups: dict[str, list[int]] = {name: [] for name in order}
    for i, value in enumerate(columns[key]):
        groups.setdefault(str(value), []).append(i)
    variants = []
    for name, rows in groups.items():
        if not rows:
            continue
        v = Variant(name, _params(listed.get(name), columns.get("params"), rows, columns["model"], name,
                                  (job.get("settings") or {}).get("request")))
        v.columns = {col: [values[i] for i in rows] for col, values in columns.items()}
        variants.append(v)
    if not variants:
        raise InputError("the output has no rows", path=path)
    baseline = job.get("baseline")
    if baseline not in groups or not groups[baseline]:
        baseline = variants[0].name
    time_column = next((c for c in ("finished_at", "created") if c in columns), None)
    return ReportData(path, job, variants, str(baseline), [s[len(_SCORE_PREFIX):] for s in scores], time_column)


def _params(listed: dict[str, Any] | None, params: list[Any] | None, rows: list[int], models: list[Any], name: str,
            request: Any) -> dict[str, Any]:
    """A variant's parameters: from the job's metadata, else its rows' ``params`` column, else its model
    and the job's request settings."""
    if listed is not None and isinstance(listed.get("params"), dict):
        return dict(listed["params"])
    if params is not None and params[rows[0]]:
        try:
            found = json.loads(params[rows[0]])
        except ValueError:
            found = None
        if isinstance(found, dict):
            return found
    model = models[rows[0]] if models[rows[0]] is not None else name
    settings = request if isinstance(request, dict) else {}
    return {"model": model, **{k: v for k, v in settings.items() if k != "model" and v not in (None, {}, [])}}


# --- numbers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScoreStat:
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True, slots=True)
class VariantSummary:
    name: str
    rows_ok: int
    rows_failed: int
    prompt_tokens: int | None  # None: no row reported usage
    completion_tokens: int | None
    cost_usd: float | None  # None: no row has a known cost
    cost_per_1k: float | None  # per 1,000 rows of known cost
    latency_p50: float
    latency_p95: float
    ttft_p50: float | None  # None: no row has a time to first token (not streamed)
    output_tps: float | None  # completion tokens per second of request time
    scores: dict[str, ScoreStat]
    diffs: dict[str, PairedDiff]  # against the baseline (empty for the baseline itself)
    cost_ratio: float | None  # cost per row over the baseline's
    invalid_rate: float | None = None  # structured output: the share of answers that broke the schema


def _known(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _score_values(v: Variant, score: str) -> list[float]:
    """A score per row, NaN where the row has none (a failed row)."""
    return [math.nan if s is None else float(s) for s in v.column(_SCORE_PREFIX + score)]


def _per_id(v: Variant, score: str) -> dict[Any, float]:
    """The score of each id, its samples averaged: what a paired comparison pairs."""
    sums: dict[Any, list[float]] = {}
    for row_id, s in zip(v.columns["id"], _score_values(v, score), strict=True):
        if not math.isnan(s):
            entry = sums.setdefault(row_id, [0.0, 0.0])
            entry[0] += s
            entry[1] += 1.0
    return {k: total / count for k, (total, count) in sums.items()}


def _score_stat(v: Variant, score: str, resamples: int) -> ScoreStat:
    values = _score_values(v, score)
    kept = [(s, row_id) for s, row_id in zip(values, v.columns["id"], strict=True) if not math.isnan(s)]
    if not kept:
        return ScoreStat(math.nan, math.nan, math.nan, 0)
    ids = [row_id for _, row_id in kept]
    scores = [s for s, _ in kept]
    if len(set(ids)) == len(ids) and all(s in (0.0, 1.0) for s in scores):
        passed = sum(1 for s in scores if s == 1.0)
        low, high = wilson(passed, len(scores))
        return ScoreStat(passed / len(scores), low, high, len(scores))
    # several samples of one row are not independent: resample whole rows
    mean, low, high = mean_ci(scores, clusters=ids if len(set(ids)) < len(ids) else None, resamples=resamples)
    return ScoreStat(mean, low, high, len(scores))


def _cost_per_row(v: Variant) -> float | None:
    costs = _known(v.column("cost_usd"))
    return sum(costs) / len(costs) if costs else None


def _invalid_rate(v: Variant, rows_ok: int) -> float | None:
    """Answers that broke the schema over all answers (each re-asked, and paid); None without a schema."""
    if INVALID_COLUMN not in v.columns:
        return None
    invalid = sum(_known(v.columns[INVALID_COLUMN]))
    return invalid / (invalid + rows_ok) if invalid + rows_ok else None


def summarize(data: ReportData, resamples: int = 2000) -> list[VariantSummary]:
    """The summary table's numbers for each variant, in the report's order; ``resamples`` per bootstrap."""
    base = next(v for v in data.variants if v.name == data.baseline)
    base_ids = {s: _per_id(base, s) for s in data.scores}
    base_cost = _cost_per_row(base)
    out = []
    for v in data.variants:
        ok = [s == "ok" for s in v.columns["status"]]
        rows_ok = sum(ok)
        prompt = _known(v.column("prompt_tokens"))
        completion = _known(v.column("completion_tokens"))
        costs = _known(v.column("cost_usd"))
        latency = _known(x for x, good in zip(v.column("latency_s"), ok, strict=True) if good)
        ttft = _known(x for x, good in zip(v.column("ttft_s"), ok, strict=True) if good)
        # tokens per second of request time, over ok rows that have both
        pairs = [(c, t) for c, t, good in zip(v.column("completion_tokens"), v.column("latency_s"), ok, strict=True)
                 if good and c is not None and t]
        cost_per_row = _cost_per_row(v)
        out.append(VariantSummary(
            name=v.name,
            rows_ok=rows_ok,
            rows_failed=len(ok) - rows_ok,
            prompt_tokens=int(sum(prompt)) if prompt else None,
            completion_tokens=int(sum(completion)) if completion else None,
            cost_usd=sum(costs) if costs else None,
            cost_per_1k=None if cost_per_row is None else 1000 * cost_per_row,
            latency_p50=percentile(latency, 50),
            latency_p95=percentile(latency, 95),
            ttft_p50=percentile(ttft, 50) if ttft else None,
            output_tps=sum(c for c, _ in pairs) / sum(t for _, t in pairs) if pairs else None,
            scores={s: _score_stat(v, s, resamples) for s in data.scores},
            diffs={} if v is base else {s: paired_diff(base_ids[s], _per_id(v, s), resamples=resamples)
                                        for s in data.scores},
            cost_ratio=None if v is base or not base_cost or cost_per_row is None else cost_per_row / base_cost,
            invalid_rate=_invalid_rate(v, rows_ok),
        ))
    return out


# --- tables (shared by Markdown and HTML) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    text_columns: int = 1  # the leading columns that are text (aligned left); the rest are numbers


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _money(x: float | None) -> str:
    if x is None:
        return "unknown"
    if x >= 1 or x <= 0:
        return f"${x:,.2f}"
    return f"${x:.{2 - math.floor(math.log10(x))}f}"  # three significant digits


def _percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _int(x: int | None) -> str:
    return "unknown" if x is None else f"{x:,}"


def _ci(s: ScoreStat) -> str:
    if s.n == 0:
        return "–"
    return f"{s.mean:.3f} [{s.low:.3f}, {s.high:.3f}]"


def _diff(d: PairedDiff) -> str:
    if d.n == 0:
        return "–"
    text = f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    if d.p_value is not None:
        text += f" p={d.p_value:.3g}"
    return text + ("" if d.low <= 0 <= d.high else " *")


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "–"


def job_facts(data: ReportData) -> list[tuple[str, str]]:
    """What the report says about the job, as (label, value) pairs."""
    identity = data.job.get("identity") or {}
    settings = data.job.get("settings") or {}
    api = settings.get("api") or {}
    rows = sum(len(v) for v in data.variants)
    facts = [
        ("job", str(identity.get("job") or (settings.get("job") or {}).get("name") or "–")),
        ("output", str(data.path)),
        ("input", str(identity.get("input") or "–")),
        ("base URL", str(api.get("base_url") or "–")),
        ("endpoint", str(api.get("endpoint") or "–")),
        ("rows", f"{rows:,} in {len(data.variants)} variant{'s' * (len(data.variants) != 1)}"),
        ("baseline", data.baseline),
        ("promptmill", str(data.job.get("promptmill") or "–")),
    ]
    return facts


def tables(data: ReportData, summaries: list[VariantSummary]) -> list[Table]:
    """The report's tables: variants, summary, scores, and the comparison with the baseline."""
    result = [Table("Variants", ["variant", "parameters"],
                    [[v.name + (" (baseline)" if v.name == data.baseline else ""), _params_text(v.params)]
                     for v in data.variants], text_columns=2)]
    has_ttft = any(s.ttft_p50 is not None for s in summaries)
    structured = any(s.invalid_rate is not None for s in summaries)
    headers = ["variant", "ok", "failed", "tokens in", "tokens out", "cost", "cost / 1k rows",
               "latency p50 s", "latency p95 s", *(["TTFT p50 s"] if has_ttft else []), "output tok/s",
               *(["invalid output"] if structured else [])]
    rows = []
    for s in summaries:
        rows.append([s.name, f"{s.rows_ok:,}", f"{s.rows_failed:,}", _int(s.prompt_tokens), _int(s.completion_tokens),
                     _money(s.cost_usd), _money(s.cost_per_1k), _num(s.latency_p50), _num(s.latency_p95),
                     *([_num(s.ttft_p50)] if has_ttft else []), _num(s.output_tps),
                     *([_percent(s.invalid_rate)] if structured else [])])
    result.append(Table("Summary", headers, rows,
                        "Latency and output tokens/s over ok rows; cost per 1,000 rows of known cost."
                        + (" Invalid output: the share of answers that broke the schema (each one asked "
                           "again and paid)." if structured else "")))
    if data.scores:
        result.append(Table(
            "Scores", ["variant", *data.scores],
            [[s.name, *(_ci(s.scores[name]) for name in data.scores)] for s in summaries],
            "Mean [95% interval]: Wilson for pass/fail scores, bootstrap for numeric ones "
            "(by row when a row has several samples). Rows without a score are left out.",
        ))
    if len(summaries) > 1:
        others = [s for s in summaries if s.name != data.baseline]
        result.append(Table(
            f"Against the baseline ({data.baseline})",
            ["variant", *(f"Δ {name}" for name in data.scores), "cost ratio"],
            [[s.name, *(_diff(s.diffs[name]) for name in data.scores),
              "–" if s.cost_ratio is None else f"{s.cost_ratio:.2f}×"] for s in others],
            "Paired difference over the rows both answered (samples of a row averaged) with its 95% interval: "
            "McNemar's test and Newcombe's interval for pass/fail scores, a paired bootstrap otherwise; "
            "* marks an interval that excludes 0. Cost ratio: cost per row against the baseline's.",
        ))
    return result


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(data: ReportData, summaries: list[VariantSummary]) -> str:
    lines = [f"# promptmill report: {job_facts(data)[0][1]}", ""]
    lines += [f"- **{label}**: {_md_cell(value)}" for label, value in job_facts(data)]
    for t in tables(data, summaries):
        lines += ["", f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
                  "|" + "|".join("---" if i < t.text_columns else "---:" for i in range(len(t.headers))) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        if t.note:
            lines += ["", t.note]
    return "\n".join(lines) + "\n"


def render(path: Path, fmt: str = "html") -> str:
    """The report of the output at ``path``, as ``"html"`` or ``"md"``."""
    if fmt == "html":
        try:
            from batch import report_html
        except ImportError as exc:  # matplotlib is an optional extra
            raise UsageError(f"the HTML report needs matplotlib ({exc.name} is missing): "
                             "pip install 'promptmill[report]', or use --format md") from None
    data = load(path)
    summaries = summarize(data)
    if fmt == "md":
        return render_markdown(data, summaries)
    return report_html.render_html(data, summaries)


def save(text: str, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, text.encode())
    except OSError as exc:
        raise OutputError(f"cannot write the report: {exc.strerror}", path=dest) from None
