"""The budget cap: money reserved before a row is sent, settled on its answer, never sent past the budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest

from batch.budget import Ledger, worst_case
from batch.errors import EXIT_REASONS, UsageError
from batch.pricing import Price
from batch.simulator import SimServer, count_prompt_tokens
from batch.tokens import messages_tokens
from tests.helpers import prompts, run_cli, write_jsonl

PRICE = Price(0.10, 0.20, 0.05)  # simulator-small's example price


def job(sim: SimServer, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--output", str(out), "--base-url", sim.base_url,
            "--model", "simulator-small", "--max-tokens", "32", "--concurrency", "4", "--no-progress",
            "--summary-json", str(out) + ".sched.json", *extra]


def summary(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(Path(str(out) + ".sched.json").read_text())  # type: ignore[no-any-return]


def full_cost(sim: SimServer, tmp_path: Path, inp: Path, capsys: pytest.CaptureFixture[str]) -> float:
    ref = tmp_path / "ref.parquet"
    assert run_cli(capsys, *job(sim, inp, ref)).code == 0
    return float(summary(ref)["totals"]["cost_usd"])


def test_worst_case_is_prompt_at_input_price_plus_every_answer_token_at_output_price() -> None:
    assert worst_case(PRICE, 1000, 500) == pytest.approx((1000 * 0.10 + 500 * 0.20) / 1e6)
    # a cached price above the input price is the worst case for the prompt
    assert worst_case(Price(0.1, 0.2, 0.3), 1000, 0) == pytest.approx(1000 * 0.3 / 1e6)


async def test_a_reservation_waits_for_rows_in_flight_then_the_pool_closes() -> None:
    ledger = Ledger(1.0, {"v": PRICE})
    a = await ledger.reserve("v", 0.6)
    assert a is not None and ledger.reserved == pytest.approx(0.6)
    got: list[object] = []

    async def second() -> None:
        got.append(await ledger.reserve("v", 0.6))

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.01)
        assert got == []  # waits: the row in flight may cost less than reserved
        ledger.settle(a, 0.3)  # it did: 0.3 spent, 0.6 fits now
    assert got and got[0] is not None and ledger.spent == pytest.approx(0.3)
    ledger.settle(got[0], None)  # no usage: counted at the reservation
    assert ledger.spent == pytest.approx(0.9) and ledger.rows_without_usage == 1
    assert await ledger.reserve("v", 0.2) is None and ledger.reached  # nothing in flight, does not fit
    assert await ledger.reserve("v", 0.01) is None  # closed for good: nothing more is sent
    assert ledger.stop_text() == "budget reached ($0.900000 of $1.000000 spent)"


async def test_per_variant_budgets_are_shares_and_close_apart() -> None:
    ledger = Ledger(1.0, {"a": PRICE, "b": PRICE}, per_variant=True, spent_before={"a": 0.45})
    assert await ledger.reserve("a", 0.1) is None  # a's share is 0.5, 0.45 already spent
    hold = await ledger.reserve("b", 0.4)
    assert hold is not None and not ledger.closed("b") and ledger.closed("a")


def test_a_budget_with_a_model_without_a_price_is_refused() -> None:
    with pytest.raises(UsageError, match="'m' has none"):
        Ledger(1.0, {"m": None})
    Ledger(None, {"m": None})  # without a budget it only counts


def test_exit_code_4_is_the_budget() -> None:
    assert "budget" in EXIT_REASONS[4]


def test_unpriced_model_with_a_budget_exits_2_sending_nothing(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "o.parquet"
    args = job(sim, inp, out, "--budget-usd", "1")
    args[args.index("simulator-small")] = "no-such-price"
    r = run_cli(capsys, *args)
    assert r.code == 2 and "'no-such-price' has none" in r.err
    assert sim.stats["requests"] == 0 and not out.exists()


def test_a_tenth_of_the_cost_stops_at_exit_4_then_reruns_carry_on_only_with_more_budget(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": "Name one colour of the sea"}
                                              for i in range(60)])
    cost = full_cost(sim, tmp_path, inp, capsys)
    out = tmp_path / "o.parquet"
    budget = cost / 10
    r = run_cli(capsys, *job(sim, inp, out, "--budget-usd", repr(budget)))
    assert r.code == 4, r.err
    s = summary(out)
    assert s["exit_code"] == 4 and s["stopped"].startswith("budget reached ($")
    said = re.search(r"stopped: budget reached \(\$([0-9.]+) of \$([0-9.]+) spent\)", r.out)
    assert said and float(said[1]) == pytest.approx(s["budget"]["spent_usd"], abs=1e-6)
    assert float(said[2]) == pytest.approx(budget, abs=1e-6)
    table = pq.read_table(out)
    assert 0 < table.num_rows < 60 and set(table["status"].to_pylist()) == {"ok"}
    assert len(set(table["id"].to_pylist())) == table.num_rows
    spent = sum(table["cost_usd"].to_pylist())
    assert spent <= budget and s["totals"]["cost_usd"] == pytest.approx(spent, abs=1e-12)

    sent = sim.stats["requests"]
    r = run_cli(capsys, *job(sim, inp, out, "--budget-usd", repr(budget)))  # the same budget: nothing sent
    assert r.code == 4 and sim.stats["requests"] == sent
    assert pq.read_table(out).num_rows == table.num_rows

    r = run_cli(capsys, *job(sim, inp, out, "--budget-usd", repr(cost * 2)))  # more: carries on to the end
    assert r.code == 0, r.err
    final = pq.read_table(out)
    assert sorted(final["id"].to_pylist()) == sorted(f"r{i}" for i in range(60))  # every row once
    assert sum(final["cost_usd"].to_pylist()) == pytest.approx(cost)  # nothing paid twice


def test_prompts_longer_than_estimated_overshoot_within_the_stated_bound(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one-letter words: the simulator counts a token a word, the estimator a token per 4 characters
    rows = [{"id": f"r{i}", "prompt": " ".join(["a"] * (200 + 10 * i))} for i in range(40)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cost = full_cost(sim, tmp_path, inp, capsys)
    out = tmp_path / "o.parquet"
    budget = cost / 3
    r = run_cli(capsys, *job(sim, inp, out, "--budget-usd", repr(budget)))
    assert r.code == 4, r.err
    spent = summary(out)["budget"]["spent_usd"]
    # the bound: the prompt error, at the input price, on the rows in flight (concurrency 4)
    errors = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        errors.append(count_prompt_tokens({"messages": messages}) - messages_tokens(messages))
    assert min(errors) > 0  # the premise: every prompt is longer than estimated
    bound = 4 * max(errors) * PRICE.input / 1e6
    assert spent <= budget + bound
    assert spent == pytest.approx(sum(pq.read_table(out)["cost_usd"].to_pylist()))
