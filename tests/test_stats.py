"""The summary's statistics against values worked by hand or published."""

from __future__ import annotations

import dataclasses
import math

import pytest

from batch.stats import PairedDiff, mcnemar_exact, mean_ci, paired_diff, percentile, wilson

# Wilson 95%, z = 1.959964, worked by hand:
#   8/10: centre = (0.8 + z²/20) / (1 + z²/10) = 0.99207 / 1.38415 = 0.71674
#         half   = z / 1.38415 * sqrt(0.016 + z²/400) = 1.41600 * 0.16001 = 0.22658
#   0/10: centre = 0.19207 / 1.38415 = 0.13877 = half  -> (0, 0.27753)
#   10/10 is 0/10 mirrored                              -> (0.72247, 1)
# (8/10 -> 0.4902 to 0.9433 is also the value in Newcombe 1998's tables.)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(8, 10, 0.49016, 0.94332), (0, 10, 0.0, 0.27753), (10, 10, 0.72247, 1.0), (1, 1, 0.20654, 1.0)],
)
def test_wilson_matches_the_formula_worked_by_hand(successes: int, n: int, low: float, high: float) -> None:
    got = wilson(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_ends_are_exact_and_empty_is_nan() -> None:
    assert wilson(0, 10)[0] == 0.0
    assert wilson(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_is_wider_at_higher_confidence() -> None:
    low95, high95 = wilson(8, 10)
    low99, high99 = wilson(8, 10, confidence=0.99)
    assert low99 < low95 and high99 > high95


@pytest.mark.parametrize(("successes", "n", "confidence"), [(11, 10, 0.95), (-1, 10, 0.95), (5, 10, 1.0)])
def test_wilson_refuses_impossible_input(successes: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        wilson(successes, n, confidence)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 6, 0.125),  # 2 * (1 + 7) / 2**7
        (6, 1, 0.125),  # symmetric
        (0, 5, 0.0625),  # 2 / 2**5
        (3, 10, 0.0922852),  # 2 * (1 + 13 + 78 + 286) / 2**13
        (2, 2, 1.0),
        (0, 0, 1.0),  # no discordant pairs: no evidence
    ],
)
def test_mcnemar_exact_small_counts(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-6)


def test_mcnemar_exact_large_counts_stay_finite() -> None:
    p = mcnemar_exact(2000, 2200)
    assert 0.0 < p < 0.01


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([4, 1, 3, 2], 25, 1.75),  # numpy: position 0.75 between 1 and 2
        ([10, 20, 30], 95, 29.0),
        ([10, 20, 30], 0, 10.0),
        ([10, 20, 30], 100, 30.0),
        ([7], 50, 7.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_mean_ci_of_pass_fail_values_is_wilson() -> None:
    assert mean_ci([1.0] * 8 + [0.0] * 2) == pytest.approx((0.8, *wilson(8, 10)))


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    values = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.35]
    first = mean_ci(values, seed=7)
    assert mean_ci(values, seed=7) == first
    assert mean_ci(values, seed=8) != first
    mean, low, high = first
    assert mean == pytest.approx(0.485)
    assert low < mean < high
    assert low >= 0.1 and high <= 0.9


def test_cluster_bootstrap_is_wider_when_samples_of_a_row_are_identical() -> None:
    # 10 rows answered 3 times each, every sample of a row scoring the same:
    # there are 10 observations, not 30.
    per_row = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    values = [v for v in per_row for _ in range(3)]
    rows = [f"row{i}" for i, _ in enumerate(per_row) for _ in range(3)]
    _, naive_low, naive_high = mean_ci(values, seed=1)
    mean, low, high = mean_ci(values, clusters=rows, seed=1)
    assert mean == pytest.approx(0.45)
    assert (high - low) > 1.4 * (naive_high - naive_low)  # about sqrt(3) wider
    # ... and it is exactly the bootstrap of one value per row.
    assert mean_ci(per_row, seed=1) == pytest.approx((mean, low, high))


def test_cluster_bootstrap_applies_to_pass_fail_values_too() -> None:
    values = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    rows = ["a", "a", "b", "b", "c", "c"]
    mean, low, high = mean_ci(values, clusters=rows, seed=3)
    assert mean == pytest.approx(2 / 3)
    assert (low, high) != pytest.approx(wilson(4, 6))
    assert 0.0 <= low <= mean <= high <= 1.0


def test_mean_ci_skips_nan_and_handles_nothing() -> None:
    assert mean_ci([1.0, math.nan, 0.0, 1.0])[0] == pytest.approx(2 / 3)
    assert all(math.isnan(x) for x in mean_ci([]))
    assert mean_ci([0.25], seed=0) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="clusters"):
        mean_ci([1.0, 2.0], clusters=["a"])


def test_paired_diff_pass_fail_uses_mcnemar_and_newcombe() -> None:
    # 10 rows: both right 3, only baseline right 1, only B right 5, neither 1.
    a = dict(enumerate([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], start=100))
    b = dict(enumerate([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], start=100))
    got = paired_diff({k: float(v) for k, v in a.items()}, {k: float(v) for k, v in b.items()})
    assert got.method == "mcnemar"
    assert got.n == 10
    assert got.diff == pytest.approx(0.4)  # 0.8 - 0.4
    assert got.p_value == pytest.approx(0.21875)  # exact binomial on 1 vs 5: 2 * 7 / 64
    # Newcombe (1998) method 10, by hand:
    #   Wilson p_B = 8/10: (0.49016, 0.94332); p_A = 4/10: (0.16818, 0.68732)
    #   phi = (3*1 - 1*5) / sqrt(4*6*8*2) = -0.10206 (negative: no continuity correction)
    #   low  = 0.4 - sqrt(0.30984² + 2*0.10206*0.30984*0.28732 + 0.28732²) = 0.4 - 0.44354
    #   high = 0.4 + sqrt(0.14332² + 2*0.10206*0.14332*0.23182 + 0.23182²) = 0.4 + 0.28472
    assert (got.low, got.high) == pytest.approx((-0.04354, 0.68472), abs=1e-4)


def test_paired_diff_pass_fail_with_positive_correlation_is_corrected() -> None:
    # both 6, only A 0, only B 2, neither 2 (n = 10): ad - bc = 12 > n/2, so
    # phi = (12 - 5) / sqrt(6*4*8*2) = 0.35722.
    a = [1.0] * 6 + [0.0] * 4
    b = [1.0] * 6 + [1.0, 1.0, 0.0, 0.0]
    got = paired_diff(dict(enumerate(a)), dict(enumerate(b)))
    # Wilson 8/10 (0.49016, 0.94332), 6/10 (0.31267, 0.83182):
    #   low  = 0.2 - sqrt(0.30984² - 2*0.35722*0.30984*0.23182 + 0.23182²) = 0.2 - 0.31373
    #   high = 0.2 + sqrt(0.14332² - 2*0.35722*0.14332*0.28733 + 0.28733²) = 0.2 + 0.27143
    assert got.p_value == pytest.approx(0.5)  # 2 * 1 / 4
    assert (got.diff, got.low, got.high) == pytest.approx((0.2, -0.11373, 0.47143), abs=1e-4)


def test_paired_diff_numeric_is_a_paired_bootstrap_over_common_keys() -> None:
    a = {"r1": 0.2, "r2": 0.5, "r3": 0.9, "r4": 0.4, "only-a": 5.0}
    b = {"r1": 0.3, "r2": 0.6, "r3": 1.0, "r4": 0.5, "only-b": -5.0}
    got = paired_diff(a, b)
    assert got.method == "paired bootstrap"
    assert got.p_value is None
    assert got.n == 4
    # every row is exactly 0.1 better: no noise in the pairs, so no width
    assert (got.diff, got.low, got.high) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_diff_numeric_interval_is_deterministic_and_contains_the_diff() -> None:
    a = {i: v for i, v in enumerate([0.5, 0.2, 0.7, 0.1, 0.6, 0.3])}
    b = {i: v for i, v in enumerate([0.6, 0.1, 0.9, 0.4, 0.6, 0.5])}
    got = paired_diff(a, b, seed=5)
    assert got.diff == pytest.approx(0.7 / 6)
    assert got.low < got.diff < got.high
    assert paired_diff(dict(reversed(a.items())), b, seed=5) == got  # key order does not matter


def test_paired_diff_without_common_rows_and_record_is_frozen() -> None:
    got = paired_diff({"a": 1.0}, {"b": 1.0})
    assert got.n == 0 and math.isnan(got.diff) and got.p_value is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.diff = 0.0  # type: ignore[misc]
    assert isinstance(got, PairedDiff)
