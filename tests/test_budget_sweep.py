"""Plans and budgets on sweeps: per-variant rows, reservations and costs, against a real run on the simulator."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from tests.helpers import prompts, run_cli, sim_job, write_jsonl

ROWS = [{"id": f"q{i}", "prompt": f"What is {i} + {2 * i}? Answer with the sum only.", "answer": 3 * i}
        for i in range(12)]
SMALL, LARGE = "model=sim-small", "model=sim-large"


def _job(tmp_path: Path, sim: SimServer, grid: str, samples: int = 2) -> Path:
    return sim_job(tmp_path, sim.base_url, ROWS, f"""[limits]
concurrency = 4
[pricing.sim-small]
input = 0.1
output = 0.2
[pricing.sim-large]
input = 0.6
output = 1.2
[sweep]
samples = {samples}
[sweep.grid]
{grid}
""")


def _run(capsys: pytest.CaptureFixture[str], job: Path, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    out = job.parent / "sched.json"
    r = run_cli(capsys, "run", job, "--no-progress", "--summary-json", out, *extra)
    assert r.code in (0, 4), r.err
    return r.code, json.loads(out.read_text())


def _plan(capsys: pytest.CaptureFixture[str], job: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    r = run_cli(capsys, "plan", job, "--json", "-")
    assert r.code == 0, r.err
    return {v["name"]: v for v in json.loads(r.out)["variants"]}


def _by_variant(out: Path) -> tuple[collections.Counter[str], dict[str, float]]:
    rows = pq.read_table(out).to_pylist()
    cost: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        cost[r["variant"]].append(r["cost_usd"])
    return collections.Counter(r["variant"] for r in rows), {v: math.fsum(c) for v, c in cost.items()}


def _cost_truth(summary: dict, cost: dict[str, float], whole: dict[str, float] | None = None) -> None:  # type: ignore[type-arg]
    """The summary's totals, and each variant's this run, equal the output's cost_usd summed, to the cent;
    each variant's entry also carries the whole output's cost (``whole``, else ``cost``: a first run)."""
    assert round(summary["totals"]["cost_usd"], 2) == round(math.fsum(cost.values()), 2)
    assert summary["totals"]["cost_usd"] == pytest.approx(math.fsum(cost.values()), abs=1e-9)
    this_run = {v["name"]: v["this_run"] for v in summary["variants"]}
    assert {v: round(t["cost_usd"], 2) for v, t in this_run.items()} == \
        {v: round(c, 2) for v, c in cost.items()}
    for name, t in this_run.items():
        assert t["cost_usd"] == pytest.approx(cost[name], abs=1e-9)
    for v in summary["variants"]:
        assert v["cost_usd"] == pytest.approx((whole or cost)[v["name"]], abs=1e-8)


def test_a_plan_of_a_2x2_grid_x_2_samples_matches_the_run_rows_exactly_and_cost_within_the_ceiling(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job(tmp_path, sim, 'model = ["sim-small", "sim-large"]\ntemperature = [0.0, 0.7]')
    first = _plan(capsys, job)
    assert sim.stats["requests"] == 0 and len(first) == 4
    assert {(v["rows_to_send"], v["rows_done"]) for v in first.values()} == {(24, 0)}  # 12 ids x 2 samples
    assert {v["output_tokens_ceiling"] for v in first.values()} == {24 * 16}

    # a budget stop part way: the requests go row by row, so every variant stops at about the same row
    ceiling = math.fsum(v["cost_ceiling_usd"] for v in first.values())
    code, summary = _run(capsys, job, "--budget-usd", repr(ceiling / 4))
    assert code == 4
    counts, cost = _by_variant(tmp_path / "out.parquet")
    assert 0 < sum(counts.values()) < 96 and set(counts) == set(first)
    assert max(counts.values()) - min(counts.values()) <= 4  # at most the requests in flight (concurrency 4)
    _cost_truth(summary, cost)

    # the plan of the rest: the resume index per (id, variant, sample), exact per variant
    second = _plan(capsys, job)
    assert {n: (v["rows_to_send"], v["rows_done"]) for n, v in second.items()} == \
        {n: (24 - counts[n], counts[n]) for n in first}
    assert {n: v["cost_in_output_usd"] for n, v in second.items()} == pytest.approx(cost)
    sent_before = len(sim.stats["params_seen"])
    code, summary = _run(capsys, job)
    assert code == 0
    rest = sim.stats["params_seen"][sent_before:]
    assert collections.Counter(b["model"] for b in rest) == {
        m: sum(v["rows_to_send"] for v in second.values() if v["model"] == m) for m in ("sim-small", "sim-large")}
    all_counts, all_cost = _by_variant(tmp_path / "out.parquet")
    assert all_counts == {n: 24 for n in first}
    for name, v in second.items():
        spent_now = all_cost[name] - cost[name]
        assert spent_now <= v["cost_ceiling_usd"]  # the stated bound: the ceiling holds
        assert v["cost_expected_usd"] == pytest.approx(spent_now, rel=0.25)
    _cost_truth(summary, {n: all_cost[n] - cost[n] for n in all_cost}, all_cost)


def test_budget_per_variant_stops_each_variant_at_its_share_and_leaves_the_others_alone(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job(tmp_path, sim, 'model = ["sim-small", "sim-large"]')
    plan = _plan(capsys, job)
    share = plan[SMALL]["cost_ceiling_usd"] * 1.01  # sim-small fits whole; sim-large costs 6 times as much
    assert plan[LARGE]["cost_ceiling_usd"] > 2 * share
    code, summary = _run(capsys, job, "--budget-usd", repr(2 * share), "--budget-per-variant")
    assert code == 4
    assert summary["stopped"].startswith("budget reached") and f"{LARGE} $" in summary["stopped"]
    assert f"{SMALL} $" not in summary["stopped"]
    counts, cost = _by_variant(tmp_path / "out.parquet")
    assert counts[SMALL] == 24  # every row of the variant whose share holds
    assert 0 < counts[LARGE] < 24 and cost[LARGE] <= share
    _cost_truth(summary, cost)
    sent = sim.stats["requests"]
    assert _run(capsys, job, "--budget-usd", repr(2 * share), "--budget-per-variant")[0] == 4
    assert sim.stats["requests"] == sent  # the same budget: nothing more


def test_earlier_rows_without_usage_count_at_their_answers_ceiling(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "o.parquet"
    args = ["run", "--input", inp, "--output", out, "--base-url", sim.base_url, "--model", "simulator-small",
            "--max-tokens", "32", "--concurrency", "2", "--no-progress", "--summary-json", tmp_path / "s.json"]
    assert run_cli(capsys, *args, "--budget-usd", "0.00006").code == 4  # about half the job
    table = pq.read_table(out)
    assert 3 < table.num_rows < 20
    known = math.fsum(table["cost_usd"].to_pylist()[3:])
    # three rows as a server that sends no usage leaves them: no tokens, no cost
    cols = {name: table[name].to_pylist() for name in ("prompt_tokens", "completion_tokens", "total_tokens",
                                                          "cost_usd")}
    for values in cols.values():
        values[:3] = [None] * 3
    for name, values in cols.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name),
                                 [values])  # type: ignore[list-item]
    pq.write_table(table, out)
    ceiling = 3 * 32 * 0.20 / 1e6  # max_tokens at simulator-small's output price
    r = run_cli(capsys, *args, "--budget-usd", repr(known + ceiling - 1e-9))
    # counted at their ceiling, the budget is reached: nothing is sent (counted at nothing, a row would fit)
    assert r.code == 4 and sim.stats["requests"] == table.num_rows
    budget = json.loads((tmp_path / "s.json").read_text())["budget"]
    assert budget["spent_before_usd"] == pytest.approx(known + ceiling)
    assert budget["rows_without_usage"] == 3 and "3 rows without usage" in r.out
