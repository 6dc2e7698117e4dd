from __future__ import annotations

import logging

import pytest

from batch.pricing import Price, PriceTable, default_prices
from batch.records import Usage


def test_cost_charges_cached_prompt_tokens_at_the_cached_price() -> None:
    table = PriceTable({"m": Price(input=2.0, output=10.0, cached_input=0.5)}, use_defaults=False)
    usage = Usage(prompt_tokens=1_000, completion_tokens=500, total_tokens=1_500, cached_tokens=400)
    # 600 uncached * 2 + 400 cached * 0.5 + 500 out * 10, per million
    assert table.cost("m", usage) == pytest.approx((600 * 2 + 400 * 0.5 + 500 * 10) / 1e6)


def test_cached_price_defaults_to_the_input_price() -> None:
    table = PriceTable({"m": Price(input=1.0, output=1.0)}, use_defaults=False)
    usage = Usage(prompt_tokens=100, completion_tokens=0, total_tokens=100, cached_tokens=100)
    assert table.cost("m", usage) == pytest.approx(100 / 1e6)


def test_unknown_model_costs_none_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable({}, use_defaults=False)
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    with caplog.at_level(logging.WARNING):
        assert table.cost("nobody/knows", usage) is None
        assert table.cost("nobody/knows", usage) is None
    assert sum("no price for model 'nobody/knows'" in r.getMessage() for r in caplog.records) == 1


def test_job_prices_override_the_shipped_examples() -> None:
    shipped = default_prices()
    assert "meta-llama/Llama-3.3-70B-Instruct" in shipped
    table = PriceTable({"meta-llama/Llama-3.3-70B-Instruct": Price(input=0.0, output=1.0)})
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=0, total_tokens=1_000_000)
    assert table.cost("meta-llama/Llama-3.3-70B-Instruct", usage) == 0.0


def test_no_usage_means_no_cost() -> None:
    assert PriceTable().cost("simulator-small", None) is None
