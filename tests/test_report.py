"""``promptmill report``: the tables hold the fixture's numbers, the HTML page is whole and offline."""

from __future__ import annotations

import importlib.util
import math
import random
import re
import statistics
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from sweep_output import BASELINE, VARIANTS, sweep_rows, write_sweep_output

import batch
from batch.stats import mean_ci, paired_diff

# the HTML report's plots need the [report] extra (matplotlib); Markdown needs nothing more
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib not installed: pip install -e '.[report]'")


def md_table(text: str, title: str) -> dict[str, dict[str, str]]:
    """The Markdown table under ``## title`` as {first cell: {header: cell}}."""
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(headers, cells, strict=True))
    return table


def by_variant(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["variant"]].append(r)
    return groups


def money(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.{2 - math.floor(math.log10(x))}f}"


def interval(mean: float, low: float, high: float, sign: str = "") -> str:
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path / "sweep.parquet"
    return out, write_sweep_output(out)


def test_markdown_summary_has_the_fixtures_numbers(sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    out, rows = sweep
    run = run_cli(capsys, "report", out, "--format", "md")
    assert run.code == 0, run.err
    summary = md_table(run.out, "Summary")
    assert list(summary) == list(VARIANTS)  # the job's order
    for name, vrows in by_variant(rows).items():
        ok = [r for r in vrows if r["status"] == "ok"]
        cells = summary[name]
        assert cells["ok"] == str(len(ok))
        assert cells["failed"] == str(len(vrows) - len(ok))
        assert cells["tokens in"] == f"{sum(r['prompt_tokens'] for r in ok):,}"
        assert cells["tokens out"] == f"{sum(r['completion_tokens'] for r in ok):,}"
        cost = sum(r["cost_usd"] for r in ok)
        assert cells["cost"] == money(cost)
        assert cells["cost / 1k rows"] == money(1000 * cost / len(ok))
        latency = sorted(r["latency_s"] for r in ok)
        assert float(cells["latency p50 s"]) == pytest.approx(statistics.median(latency), rel=5e-3)
        p95 = statistics.quantiles(latency, n=20, method="inclusive")[18]
        assert float(cells["latency p95 s"]) == pytest.approx(p95, rel=5e-3)
        assert float(cells["TTFT p50 s"]) == pytest.approx(statistics.median(r["ttft_s"] for r in ok), rel=5e-3)
        tps = sum(r["completion_tokens"] for r in ok) / sum(r["latency_s"] for r in ok)
        assert float(cells["output tok/s"]) == pytest.approx(tps, rel=5e-3)
    variants = md_table(run.out, "Variants")
    assert variants[f"{BASELINE} (baseline)"]["parameters"] == "model=sim-small, temperature=0.0"


def test_markdown_scores_and_comparison_with_the_baseline(sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    out, rows = sweep
    run = run_cli(capsys, "report", out, "--format", "md")
    assert run.code == 0, run.err
    scores = md_table(run.out, "Scores")
    compared = md_table(run.out, f"Against the baseline ({BASELINE})")
    assert list(compared) == [n for n in VARIANTS if n != BASELINE]
    groups = by_variant(rows)

    def per_id(name: str, score: str) -> dict[str, float]:
        values: dict[str, list[float]] = defaultdict(list)
        for r in groups[name]:
            if r[score] is not None:
                values[r["id"]].append(r[score])
        return {k: sum(v) / len(v) for k, v in values.items()}

    base_cost = statistics.fmean(r["cost_usd"] for r in groups[BASELINE] if r["status"] == "ok")
    for name, vrows in groups.items():
        for score in ("exact", "quality"):
            scored = [r for r in vrows if r[f"score_{score}"] is not None]
            values = [r[f"score_{score}"] for r in scored]
            # two samples per row: the interval resamples whole rows
            mean, low, high = mean_ci(values, clusters=[r["id"] for r in scored])
            assert mean == pytest.approx(statistics.fmean(values))
            assert scores[name][score] == interval(mean, low, high)
            if name == BASELINE:
                continue
            d = paired_diff(per_id(BASELINE, f"score_{score}"), per_id(name, f"score_{score}"))
            a, b = per_id(BASELINE, f"score_{score}"), per_id(name, f"score_{score}")
            assert d.diff == pytest.approx(statistics.fmean(b[k] - a[k] for k in a.keys() & b.keys()))
            cell = compared[name][f"Δ {score}"]
            assert cell.startswith(interval(d.diff, d.low, d.high, "+"))
            assert cell.endswith("*") == (not d.low <= 0 <= d.high)
        cost = statistics.fmean(r["cost_usd"] for r in vrows if r["status"] == "ok")
        if name != BASELINE:
            assert compared[name]["cost ratio"] == f"{cost / base_cost:.2f}×"
    # the large model's exact-match gain is beyond noise in this fixture, the warmer small one's is not
    assert compared["large-t0"]["Δ exact"].endswith("*")
    assert not compared["small-t7"]["Δ exact"].endswith("*")


def test_baseline_from_the_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.parquet"
    write_sweep_output(out, baseline="large-t0")
    run = run_cli(capsys, "report", out, "--format", "md")
    assert run.code == 0, run.err
    compared = md_table(run.out, "Against the baseline (large-t0)")
    assert list(compared) == ["small-t0", "small-t7"]
    assert compared["small-t0"]["Δ exact"].startswith("-")


@needs_matplotlib
def test_html_report_is_whole_offline_and_small(sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = sweep
    dest = out.with_name("r.html")
    run = run_cli(capsys, "report", out, "-o", dest)
    assert run.code == 0, run.err
    page = dest.read_text()
    assert dest.stat().st_size < 2_000_000
    assert page.count("<svg") == 5
    for plot in ("score-cost", "latency", "lengths", "failures", "progress"):
        assert re.search(rf'<figure id="plot-{plot}"><svg[^>]*>.*?<path', page, re.S), plot
    # nothing is fetched: no external src/href/url(), and the page forbids it anyway
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", page, re.I)
    assert "@import" not in page
    assert "<script" not in page
    assert re.search(r'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'', page)
    # the same tables as the Markdown
    md = run_cli(capsys, "report", out, "--format", "md").out
    for name, cells in md_table(md, "Summary").items():
        row = "".join(f"<td>{c.replace('&', '&amp;')}</td>" for c in cells.values())
        assert row in page, name


@needs_matplotlib
def test_html_next_to_the_output_by_default_and_md_to_stdout(sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = sweep
    run = run_cli(capsys, "report", out)
    assert run.code == 0, run.err
    assert out.with_name("sweep.report.html").is_file()
    assert run.out == ""
    run = run_cli(capsys, "report", out, "--format", "md", "-o", out.with_name("r.md"))
    assert run.code == 0 and run.out == ""
    assert out.with_name("r.md").read_text().startswith("# promptmill report: report-test")


@needs_matplotlib
def test_plain_output_is_one_variant_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plain.parquet"
    rows = write_sweep_output(out, drop=("variant", "sample", "params", "finished_at", "score_*"), sweep_metadata=False)
    run = run_cli(capsys, "report", out, "--format", "md")
    assert run.code == 0, run.err
    summary = md_table(run.out, "Summary")
    assert list(summary) == ["sim-small", "sim-large"]
    assert summary["sim-small"]["ok"] == str(sum(r["model"] == "sim-small" and r["status"] == "ok" for r in rows))
    assert "## Scores" not in run.out
    assert md_table(run.out, "Against the baseline (sim-small)")["sim-large"]["cost ratio"].endswith("×")
    run = run_cli(capsys, "report", out, "-o", tmp_path / "plain.html")
    assert run.code == 0, run.err
    page = (tmp_path / "plain.html").read_text()
    assert page.count("<svg") == 4  # no scores, no score-against-cost plot
    assert "from created" in page  # rows over time from the created timestamps


@pytest.mark.parametrize("kind", ["missing", "not parquet", "not promptmill"])
def test_bad_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "x.parquet"
    if kind == "not parquet":
        path.write_text("id,status\n1,ok\n")
    elif kind == "not promptmill":
        pq.write_table(pa.table({"id": ["a"], "status": ["ok"]}), path)
    run = run_cli(capsys, "report", path, "--format", "md")
    assert run.code == 2
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], run.err
    assert "Traceback" not in run.err
    assert {"missing": "no such file", "not parquet": "not a readable Parquet file",
            "not promptmill": "not a promptmill output"}[kind] in lines[0]


def test_without_matplotlib_md_works_and_html_says_what_to_install(
    sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = sweep
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "batch.report_html", raising=False)
    monkeypatch.delattr(batch, "report_html", raising=False)  # an earlier import left it on the package
    run = run_cli(capsys, "report", out)
    assert run.code == 2
    assert run.err.count("\n") == 1 and "pip install 'promptmill[report]'" in run.err
    assert not out.with_name("sweep.report.html").exists()
    run = run_cli(capsys, "report", out, "--format", "md")
    assert run.code == 0 and "## Summary" in run.out


@needs_matplotlib
def test_html_size_does_not_grow_with_the_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = sweep_rows()
    jitter = random.Random(0)
    sizes = []
    for copies in (100, 1000):  # 3,000 rows, then 30,000
        # uneven finish times: a straight line would be simplified away by the plotting library anyway
        rows = [{**r, "id": f"{r['id']}-{k}",
                 "finished_at": r["finished_at"] + timedelta(seconds=k * 30 + jitter.uniform(0, 60))}
                for k in range(copies) for r in base]
        out = tmp_path / f"o{copies}.parquet"
        write_sweep_output(out, rows, drop=("score_*",))  # scores only cost bootstrap time here
        run = run_cli(capsys, "report", out, "-o", tmp_path / f"o{copies}.html")
        assert run.code == 0, run.err
        sizes.append((tmp_path / f"o{copies}.html").stat().st_size)
    assert sizes[1] < 1.2 * sizes[0], sizes  # no plot draws a mark per row
