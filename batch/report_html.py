"""The HTML report: the tables of :mod:`batch.report` and five plots, in one self-contained page.

The plots are drawn by matplotlib (the ``[report]`` extra) as inline SVG, their
text as paths, so the page needs no font, script, style sheet or image from
anywhere; a Content-Security-Policy forbids the browser to load any. Every plot
is bounded in size whatever the number of rows (no per-row marks): box plots
without outliers, histograms, step lines.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import matplotlib
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from batch.report import ReportData, Table, VariantSummary, job_facts, tables

__all__ = ["PLOTS", "render_html"]

_WIDTH_IN = 8.0
_CURVE_POINTS = 400  # points of a rows-over-time line
_CAUSES = 8  # failure causes named; the rest are "other"
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1200px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 22px; margin-bottom: 6px; } h2 { font-size: 17px; margin: 28px 0 8px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: #666; } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f5f7; font-weight: 600; }
.wrap td:last-child, .wrap th:last-child { white-space: normal; text-align: left; }
.scroll { overflow-x: auto; }
p.note, p.caption { color: #555; font-size: 13px; margin: 6px 0; max-width: 860px; }
figure { margin: 8px 0 24px; } svg { max-width: 100%; height: auto; display: block; }
"""


def _colors(data: ReportData) -> dict[str, str]:
    cmap = colormaps["tab10"]
    return {v.name: _hex(cmap(i % 10)) for i, v in enumerate(data.variants)}


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def _figure(height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(_WIDTH_IN, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an SVG element for inlining: no XML prolog, DOCTYPE or namespace URLs."""
    buf = io.StringIO()
    # a salt per plot keeps the ids of clip paths and markers unique in the page
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # HTML parses inline SVG (and xlink:href) without the namespace declarations
    return re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", text, count=2)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _variant_height(data: ReportData) -> float:
    return min(1.4 + 0.42 * len(data.variants), 9.0)


def plot_score_cost(data: ReportData, summaries: list[VariantSummary]) -> str:
    """Each score's mean (with its interval) against the cost per 1,000 rows; the front of the best trade-offs."""
    colors = _colors(data)
    n = len(data.scores)
    fig = Figure(figsize=(_WIDTH_IN, 3.6 if n == 1 else 3.2 * math.ceil(n / 2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(n / 2) if n > 1 else 1, 2 if n > 1 else 1, squeeze=False).ravel()
    for ax, score in zip(axes, data.scores, strict=False):
        points = [(s.cost_per_1k, s.scores[score], s.name) for s in summaries
                  if s.cost_per_1k is not None and s.scores[score].n]
        if not points:
            _empty(ax, f"{score}: no variant has both a score and a known cost")
            continue
        for cost, st, name in points:
            ax.errorbar([cost], [st.mean], yerr=[[st.mean - st.low], [st.high - st.mean]], fmt="o", ms=7,
                        capsize=4, color=colors[name], label=name)
        # the front: variants no other variant beats on both cost and score
        front = sorted((c, st.mean) for c, st, _ in points
                       if not any(c2 <= c and s2.mean >= st.mean and (c2, s2.mean) != (c, st.mean)
                                  for c2, s2, _ in points))
        if len(front) > 1:
            ax.plot([c for c, _ in front], [m for _, m in front], "--", color="#999", lw=1, zorder=0)
        ax.set_xlabel("cost per 1,000 rows (USD)")
        ax.set_ylabel(f"{score} (mean, 95% interval)")
        ax.set_title(score, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.15)
        ax.set_xlim(left=0)
        ax.legend(fontsize=8, frameon=False)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _svg(fig, "score-cost")


def plot_latency(data: ReportData, summaries: list[VariantSummary]) -> str:
    """Latency of ok rows per variant: box = quartiles, whiskers = 5th and 95th percentiles."""
    fig, ax = _figure(_variant_height(data))
    series = [([t for t, st in zip(v.column("latency_s"), v.columns["status"], strict=True)
                if st == "ok" and t is not None], v.name) for v in data.variants]
    _boxes(ax, series, _colors(data), "latency (s)")
    return _svg(fig, "latency")


def _boxes(ax: Axes, series: list[tuple[list[float], str]], colors: dict[str, str], label: str) -> None:
    shown = [(values, name) for values, name in series if values]
    if not shown:
        _empty(ax, "no values")
        return
    parts = ax.boxplot([values for values, _ in shown], orientation="horizontal", whis=(5, 95), showfliers=False,
                       patch_artist=True, widths=0.6, medianprops={"color": "#222"})
    for box, (_, name) in zip(parts["boxes"], shown, strict=True):
        box.set_facecolor(colors[name])
        box.set_alpha(0.75)
    ax.set_yticks(range(1, len(shown) + 1), [name for _, name in shown])
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)


def plot_lengths(data: ReportData, summaries: list[VariantSummary]) -> str:
    """Completion tokens of ok rows per variant, as overlaid histograms on shared bins."""
    fig, ax = _figure(3.4)
    colors = _colors(data)
    series = [([c for c, st in zip(v.column("completion_tokens"), v.columns["status"], strict=True)
                if st == "ok" and c is not None], v.name) for v in data.variants]
    values = [c for s, _ in series for c in s]
    if not values:
        _empty(ax, "no ok rows with usage")
    else:
        low, high = min(values), max(values)
        bins = min(40, max(1, high - low + 1))
        for s, name in series:
            if s:
                ax.hist(s, bins=bins, range=(low - 0.5, high + 0.5), histtype="stepfilled", alpha=0.3,
                        color=colors[name])
                ax.hist(s, bins=bins, range=(low - 0.5, high + 0.5), histtype="step", lw=1.4,
                        color=colors[name], label=name)
        ax.set_xlabel("output length (completion tokens)")
        ax.set_ylabel("rows")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    return _svg(fig, "lengths")


def _cause(code: str | None, http_status: int | None) -> str:
    if code:
        return f"{code} (HTTP {http_status})" if http_status else str(code)
    return f"HTTP {http_status}" if http_status else "unknown"


def plot_failures(data: ReportData, summaries: list[VariantSummary]) -> str:
    """Failed rows per variant, stacked by cause (error code and HTTP status)."""
    fig, ax = _figure(_variant_height(data))
    counts = {v.name: Counter(_cause(c, h) for c, h, st in zip(v.column("error_code"), v.column("http_status"),
                                                               v.columns["status"], strict=True) if st != "ok")
              for v in data.variants}
    ranked = [c for c, _ in sum(counts.values(), Counter()).most_common()]
    if len(ranked) > _CAUSES:  # the rarest causes in one bar segment
        for counter in counts.values():
            counter["other"] += sum(counter.pop(c, 0) for c in ranked[_CAUSES - 1:])
        ranked = [*ranked[:_CAUSES - 1], "other"]
    causes = ranked
    if not causes:
        _empty(ax, "no failed rows")
        return _svg(fig, "failures")
    names = [v.name for v in data.variants]
    left = [0] * len(names)
    cmap = colormaps["Set2"]
    for i, cause in enumerate(causes):
        widths = [counts[n][cause] for n in names]
        ax.barh(names, widths, left=left, color=cmap(i % 8), label=cause, height=0.6)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("failed rows")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, max(left) * 1.08)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig, "failures")


def plot_progress(data: ReportData, summaries: list[VariantSummary]) -> str:
    """Rows finished (ok or failed) per variant against the time since the first finished."""
    fig, ax = _figure(3.4)
    colors = _colors(data)
    column = data.time_column
    times = {v.name: sorted(t for t in v.column(column) if t is not None) if column else [] for v in data.variants}
    starts = [ts[0] for ts in times.values() if ts]
    if not starts:
        _empty(ax, "no row has a finish time")
        return _svg(fig, "progress")
    start: datetime = min(starts)
    span = max(ts[-1] for ts in times.values() if ts) - start
    scale, unit = (60.0, "min") if span.total_seconds() > 600 else (1.0, "s")
    for name, ts in times.items():
        if ts:
            # at most _CURVE_POINTS points per line, whatever the number of rows
            picks = sorted({round(i * (len(ts) - 1) / (_CURVE_POINTS - 1)) for i in range(_CURVE_POINTS)})
            xs = [(ts[i] - start).total_seconds() / scale for i in picks]
            ax.step([0.0, *xs], [0, *(i + 1 for i in picks)], where="post", color=colors[name], lw=1.6, label=name)
    ax.set_xlabel(f"time since the first row finished ({unit}; from {column})")
    ax.set_ylabel("rows finished")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _svg(fig, "progress")


#: (id, title, caption, draw) of each plot, in page order
PLOTS: tuple[tuple[str, str, str, Callable[[ReportData, list[VariantSummary]], str]], ...] = (
    ("score-cost", "Score against cost",
     "Each variant's mean score with its 95% interval against its cost per 1,000 rows. Up and to the left is "
     "better; the dashed line joins the variants no other beats on both (the trade-off front).", plot_score_cost),
    ("latency", "Latency",
     "Latency of ok rows per variant: the box spans the quartiles with the median inside, the whiskers the 5th "
     "and 95th percentiles.", plot_latency),
    ("lengths", "Output length",
     "How many completion tokens the ok rows of each variant have.", plot_lengths),
    ("failures", "Failures by cause",
     "Failed rows per variant, by the error code and HTTP status of their last attempt.", plot_failures),
    ("progress", "Rows finished over time",
     "Rows finished per variant since the first one finished: a sweep that keeps its variants at the same pace "
     "shows lines that rise together.", plot_progress),
)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    wrap = ' class="wrap"' if t.title == "Variants" else ""
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f"<h2>{html.escape(t.title)}</h2><div class=\"scroll\"><table{wrap}><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>{note}")


def render_html(data: ReportData, summaries: list[VariantSummary]) -> str:
    """The whole page."""
    facts = job_facts(data)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>promptmill report: {html.escape(facts[0][1])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>promptmill report: {html.escape(facts[0][1])}</h1>",
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts) + "</dl>",
    ]
    parts += [_table_html(t) for t in tables(data, summaries)]
    for plot_id, title, caption, draw in PLOTS:
        if plot_id == "score-cost" and not data.scores:
            continue
        parts.append(f'<h2>{html.escape(title)}</h2><figure id="plot-{plot_id}">{draw(data, summaries)}'
                     f'<figcaption><p class="caption">{html.escape(caption)}</p></figcaption></figure>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
