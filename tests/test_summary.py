from __future__ import annotations

import json
import math
from array import array
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from batch.records import Result
from batch.summary import Summary, percentile


def r(model: str, status: str = "ok", cost: float | None = 0.5, latency: float = 1.0, **kw: object) -> Result:
    base: dict[str, object] = dict(index=0, id="x", passthrough={}, fingerprint="f", model=model, endpoint="chat",
                                   status=status, latency_s=latency)
    if status == "ok":
        base.update(prompt_tokens=10, completion_tokens=20, total_tokens=30, cached_tokens=4,
                    reasoning_tokens=2, cost_usd=cost)
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def test_totals_per_model_and_overall(tmp_path: Path) -> None:
    s = Summary(job="j", output="o.parquet")
    s.add(r("a", latency=1.0))
    s.add(r("a", latency=3.0))
    s.add(r("b", cost=None, latency=2.0))
    s.add(r("b", status="failed", http_status=500, error_code="server_error"))
    s.wall_s = 2.0
    d = s.as_dict()
    assert d["rows_ok"] == 3 and d["rows_failed"] == 1
    assert d["models"]["a"]["cost_usd"] == 1.0
    assert d["models"]["b"]["rows_unpriced"] == 1
    assert d["totals"]["prompt_tokens"] == 30
    assert d["totals"]["cached_tokens"] == 12
    assert d["totals"]["reasoning_tokens"] == 6
    assert d["errors"] == {"server_error": 1}
    assert d["rows_per_s"] == 2.0
    assert d["latency_p50_s"] == 2.0
    assert d["latency_p95_s"] == 3.0
    s.write_json(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == d
    text = s.render()
    assert "3 ok, 1 failed" in text
    assert "$1.000000  a" in text
    assert "1 rows with no price" in text


def test_percentile_nearest_rank() -> None:
    values = array("d", [float(v) for v in range(1, 101)])
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(array("d"), 50) is None


@given(st.lists(st.floats(min_value=0, max_value=600, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([1, 25, 50, 90, 95, 99, 100]))
def test_percentile_is_the_nearest_rank_of_the_sorted_values(values: list[float], q: int) -> None:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(values) - 1e-9))
    assert percentile(array("d", values), q) == ordered[rank - 1]


def test_percentiles_of_many_latencies_match_the_sorted_values() -> None:
    # over 65,536 values Arrow selects them; the same nearest ranks as a sort
    n = 70_001
    values = array("d", ((i * 7919) % n / 1000 for i in range(n)))
    ordered = sorted(values)
    for q in (50, 95, 99):
        assert percentile(values, q) == ordered[math.ceil(q / 100 * n) - 1]


def no_usage(model: str) -> Result:
    return r(model, prompt_tokens=None, completion_tokens=None, total_tokens=None, cached_tokens=None,
             reasoning_tokens=None, cost_usd=None)


def test_a_job_with_no_usage_at_all_says_tokens_and_cost_are_unknown() -> None:
    s = Summary(job="j", output="o.parquet")
    for _ in range(3):
        s.add(no_usage("local"))
    d = s.as_dict()
    assert d["totals"]["rows_without_usage"] == 3
    assert d["totals"]["cost_usd"] is None and d["totals"]["prompt_tokens"] is None
    text = s.render()
    assert "tokens    unknown: the server reported no usage for any of the 3 ok rows" in text
    assert "cost      unknown (3 rows without usage)  local" in text
    assert "$0" not in text and " 0 in" not in text


def test_rows_without_usage_are_counted_beside_the_known_cost() -> None:
    s = Summary(job="j", output="o.parquet")
    s.add(r("a", cost=0.25))
    s.add(r("a", cost=0.25))
    s.add(no_usage("a"))
    s.add(r("a", status="failed", http_status=500))  # a failed row is not a row without usage
    d = s.as_dict()
    assert d["models"]["a"]["rows_without_usage"] == 1
    assert d["models"]["a"]["cost_usd"] == 0.5 and d["models"]["a"]["prompt_tokens"] == 20
    text = s.render()
    assert "20 in (8 cached), 40 out (4 reasoning); 1 rows reported no usage" in text
    assert "cost      $0.500000 + 1 rows of unknown cost (1 rows without usage)  a" in text


def test_a_job_with_usage_everywhere_shows_no_unknowns() -> None:
    s = Summary(job="j", output="o.parquet")
    s.add(r("a", cost=0.25))
    assert s.as_dict()["totals"]["rows_without_usage"] == 0
    assert "unknown" not in s.render()
