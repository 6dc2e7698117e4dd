"""Structured output with variants and a budget: every variant asks for the schema, re-asks counted
per variant, logged once a kind, shown in the report, and paid against the budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from tests.helpers import prompts, run_cli, write_jsonl
from tests.test_report import md_table

QA = {"type": "object", "required": ["question", "answer"],
      "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}
VARIANTS = ["temperature=0.0", "temperature=0.7"]


def sweep_job(tmp_path: Path, sim: SimServer, schema: dict[str, Any], *, n: int = 40, parse_attempts: int = 6,
              limits: str = "", tail: str = "[sweep.grid]\ntemperature = [0.0, 0.7]") -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(n))
    (tmp_path / "qa.json").write_text(json.dumps(schema))
    path = tmp_path / "job.toml"
    path.write_text(f"""
[input]
path = "{tmp_path / 'in.jsonl'}"
[output]
path = "{tmp_path / 'out.parquet'}"
schema_file = "{tmp_path / 'qa.json'}"
parse_attempts = {parse_attempts}
[api]
base_url = "{sim.base_url}"
[request]
model = "simulator-small"
max_tokens = 64
[limits]
concurrency = 8
{limits}
[retry]
initial_wait_s = 0.0
max_attempts = 8
{tail}
""")
    return path


def test_every_variant_asks_for_the_schema_and_its_reasks_are_counted_by_variant(
        sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    sim.configure(invalid_output_rate=0.3)
    caplog.set_level(logging.WARNING, logger="batch")
    run = run_cli(capsys, "run", sweep_job(tmp_path, sim, QA), "--no-progress")
    assert run.code == 0, run.err
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 80
    # the simulator answers prose to a request without a schema: every row parsed means every variant sent it
    assert all(r["status"] == "ok" and r["parsed"]["answer"] for r in rows)
    summary = json.loads((tmp_path / "out.parquet.summary.json").read_text())
    expected = {v: {"rows_reasked": sum(r["invalid_answers"] > 0 for r in rows if r["variant"] == v),
                    "rows_never_valid": 0} for v in VARIANTS}
    assert summary["structured"] == expected
    reasked = sum(c["rows_reasked"] for c in expected.values())
    assert reasked > 5, "at a 30% rate many rows need a re-ask"
    # one warning per kind of broken answer (not JSON, a property missing), not one per re-ask
    told = [m for m in caplog.messages if "asking again" in m]
    assert 1 <= len(told) <= 2, told
    assert not [m for m in caplog.messages if "retrying in" in m]

    report = run_cli(capsys, "report", tmp_path / "out.parquet", "--format", "md")
    assert report.code == 0, report.err
    table = md_table(report.out, "Summary")
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        bad = sum(r["invalid_answers"] for r in mine)
        assert table[v]["invalid output"] == f"{100 * bad / (bad + len(mine)):.1f}%"


def test_a_sweep_rerun_sends_nothing_and_a_new_schema_redoes_every_variant(
        sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sweep_job(tmp_path, sim, QA, n=6)
    assert run_cli(capsys, "run", path, "--no-progress").code == 0
    sent = sim.stats["requests"]
    assert sent == 12
    assert run_cli(capsys, "run", path, "--no-progress").code == 0
    assert sim.stats["requests"] == sent
    changed = {**QA, "properties": {**QA["properties"], "note": {"type": "string"}}}
    assert run_cli(capsys, "run", sweep_job(tmp_path, sim, changed, n=6), "--no-progress").code == 0
    assert sim.stats["requests"] == sent + 12
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 12 and {r["variant"] for r in rows} == set(VARIANTS)


def test_answers_that_broke_the_schema_are_paid_against_the_budget(
        sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim.configure(invalid_output_rate=1.0)
    path = sweep_job(tmp_path, sim, QA, n=10, parse_attempts=2, limits="budget_usd = 1.0", tail="")
    out = tmp_path / "out.parquet"
    run = run_cli(capsys, "run", path, "--no-progress", "--summary-json", str(out) + ".s.json")
    assert run.code == 1, run.err  # every row failed: none ever followed the schema
    rows = pq.read_table(out).to_pylist()
    assert all(r["error_code"] == "invalid_output" and r["invalid_answers"] == 3 for r in rows)
    paid = sum(r["cost_usd"] for r in rows)
    assert paid > 0
    budget = json.loads(Path(str(out) + ".s.json").read_text())["budget"]
    assert budget["spent_usd"] == pytest.approx(paid, rel=1e-6)
