"""The summary per variant at the end of a sweep: numbers checked against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from batch.variant_summary import section
from tests.helpers import run_cli, write_jsonl
from tests.sweep_output import ROWS, sweep_job

# 10 ids, one sample each. A (the baseline) passes 6, B passes those 6 and 3 more.
A_OK = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
B_OK = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]


def _fixed_output(path: Path) -> None:
    rows: dict[str, list[Any]] = {k: [] for k in (
        "id", "status", "model", "variant", "sample", "latency_s", "cost_usd", "prompt_tokens",
        "completion_tokens", "score_ok", "score_q")}
    for name, oks, cost, shift in (("A", A_OK, 0.001, 0.0), ("B", B_OK, 0.002, 0.2)):
        for i in range(10):
            for key, value in (("id", f"q{i}"), ("status", "ok"), ("model", f"m-{name}"), ("variant", name),
                               ("sample", 0), ("latency_s", (i + 1) / 10), ("cost_usd", cost),
                               ("prompt_tokens", 10), ("completion_tokens", 5), ("score_ok", float(oks[i])),
                               ("score_q", i / 10 + shift)):
                rows[key].append(value)
    meta = {"variants": [{"name": "A", "params": {"model": "m-A"}}, {"name": "B", "params": {"model": "m-B"}}],
            "baseline": "A"}
    pq.write_table(pa.table(rows).replace_schema_metadata({b"promptmill.job": json.dumps(meta).encode()}), path)


def test_scores_intervals_and_the_comparison_match_hand_computed_values(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    _fixed_output(out)
    variants, lines = section(out)
    a, b = variants
    assert a["baseline"] and not b["baseline"]
    assert (a["rows_ok"], a["rows_failed"], a["prompt_tokens"], a["completion_tokens"]) == (10, 0, 100, 50)
    assert a["cost_usd"] == pytest.approx(0.01) and b["cost_usd"] == pytest.approx(0.02)
    assert a["cost_per_1k_rows_usd"] == pytest.approx(1.0) and b["cost_per_1k_rows_usd"] == pytest.approx(2.0)
    # latencies 0.1 .. 1.0: p50 0.55 and p95 0.955 (linear between order statistics)
    assert (a["latency_p50_s"], a["latency_p95_s"]) == (0.55, 0.955)
    assert a["ttft_p50_s"] is None  # not streamed
    assert a["output_tokens_per_s"] == round(50 / 5.5, 2)
    # Wilson 95% for 6/10 and 9/10 (textbook values)
    assert a["scores"]["ok"]["mean"] == 0.6 and b["scores"]["ok"]["mean"] == 0.9
    assert a["scores"]["ok"]["ci95"] == pytest.approx([0.3127, 0.8318], abs=1e-4)
    assert b["scores"]["ok"]["ci95"] == pytest.approx([0.5958, 0.9821], abs=1e-4)
    # paired: 3 rows only B passes, none only A passes: McNemar's exact p = 2 * (1/2)^3
    ok = b["vs_baseline"]["scores"]["ok"]
    assert (ok["diff"], ok["n"], ok["method"], ok["p_value"]) == (pytest.approx(0.3), 10, "mcnemar", 0.25)
    assert ok["ci95"][0] < 0 < 0.3 < ok["ci95"][1] and ok["beyond_noise"] is False
    # every row of B is exactly 0.2 above A's: the paired bootstrap cannot but give [0.2, 0.2]
    q = b["vs_baseline"]["scores"]["q"]
    assert q["diff"] == pytest.approx(0.2) and q["ci95"] == pytest.approx([0.2, 0.2]) and q["beyond_noise"] is True
    assert a["scores"]["q"]["mean"] == pytest.approx(0.45)
    assert b["vs_baseline"]["cost_ratio"] == 2.0
    low, high = (round(100 * x, 1) for x in ok["ci95"])
    assert b["vs_baseline"]["lines"] == [
        f"B is 30.0 points better than A on ok (95% CI {low:.1f} to {high:.1f}) at 2.00x the cost; "
        "within noise (n=10 rows)",
        "B is 0.200 better than A on q (95% CI 0.200 to 0.200) at 2.00x the cost; beyond noise (n=10 rows)",
    ]
    assert lines[-2:] == [f"  vs base   {line}" for line in b["vs_baseline"]["lines"]]
    assert section(out) == (variants, lines)  # seeded: the same output gives the same intervals


PRICES = """
[pricing.sim-small]
input = 1.0
output = 2.0
[pricing.sim-large]
input = 3.0
output = 6.0
"""


def test_a_sweep_prints_and_writes_its_variants(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    job = sweep_job(tmp_path, sim, PRICES)
    run = run_cli(capsys, "run", job, "--no-progress", "--summary-json", tmp_path / "s.json")
    assert run.code == 0, run.err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["variants"] == json.loads((tmp_path / "out.parquet.summary.json").read_text())["variants"]
    names = [v["name"] for v in doc["variants"]]
    assert names == [f"model={m},temperature={t}" for m in ("sim-small", "sim-large") for t in ("0.0", "0.7")]
    assert [v["rows_ok"] for v in doc["variants"]] == [15] * 4 and doc["variants"][0]["baseline"]
    large = doc["variants"][2]
    assert large["vs_baseline"]["cost_ratio"] == pytest.approx(3.0)  # same tokens at three times the price
    line = large["vs_baseline"]["lines"][0]
    assert line.startswith("model=sim-large,temperature=0.0 is ")
    assert "than model=sim-small,temperature=0.0 on correct (95% CI " in line
    assert "at 3.00x the cost" in line
    assert f"vs base   {line}" in run.out
    assert "cost / 1k rows" in run.out


def test_a_plain_job_has_no_variants_section(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\n[output]\npath = "{tmp_path / "out.parquet"}"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\n[request]\nmodel = "sim-small"\n')
    run = run_cli(capsys, "run", job, "--no-progress")
    assert run.code == 0, run.err
    assert "variants" not in json.loads((tmp_path / "out.parquet.summary.json").read_text())
    assert "vs base" not in run.out
