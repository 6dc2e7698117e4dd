"""``promptmill plan``: what a run would send, use, cost and take, before anything is sent.

The input is read as a run reads it (streamed), each row's request is built and
checked against the resume index, and the rows to send are counted per variant with
their estimated prompt tokens (:mod:`batch.tokens`, the limiter's estimator). An
earlier output of the same job calibrates the estimate (real prompt tokens over
estimated ones, per model, on the rows both know) and gives the expected answer
length and latency. Prices come from the job's table (:mod:`batch.pricing`).
Rendering is :mod:`batch.plan_render`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from batch.budget import job_prices, spent_before, worst_case
from batch.errors import OutputError
from batch.fanout import Fanout
from batch.pricing import Price
from batch.records import Row
from batch.sources import open_source
from batch.spec import JobSpec
from batch.store import (
    PLAIN_KEY,
    SWEEP_KEY,
    check_not_input,
    check_output_ours,
    load_index,
    read_job_identity,
)
from batch.store.history import earlier_rows, empty_history
from batch.tokens import answer_tokens

__all__ = ["ASSUMED_LATENCY_S", "Plan", "TargetPlan", "VariantPlan", "make_plan"]

#: the latency assumed for the time bound when no earlier output says better
ASSUMED_LATENCY_S = 2.0


@dataclass(slots=True)
class VariantPlan:
    name: str
    model: str
    target: str
    price: Price | None
    rows_to_send: int = 0
    rows_done: int = 0
    requests_to_send: int = 0  # rows_to_send, or fewer with sample_mode = "n" (a request answers n rows)
    prompt_tokens_raw: int = 0  # the estimator's figure, before calibration
    output_ceiling: int = 0  # max_tokens * n, summed
    calibration: float | None = None  # real / estimated prompt tokens, from an earlier output
    mean_completion: float | None = None  # an earlier output's completion tokens per ok row
    spent_before: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return round(self.prompt_tokens_raw * (self.calibration or 1.0))

    @property
    def output_expected(self) -> int | None:
        return None if self.mean_completion is None else round(self.mean_completion * self.rows_to_send)

    @property
    def cost_ceiling(self) -> float | None:
        return None if self.price is None else worst_case(self.price, self.prompt_tokens, self.output_ceiling)

    @property
    def cost_expected(self) -> float | None:
        if self.price is None or self.output_expected is None:
            return None
        return (self.prompt_tokens * self.price.input + self.output_expected * self.price.output) / 1_000_000


@dataclass(slots=True)
class TargetPlan:
    """The time a target's limits set, at the least: each bound, the largest binds."""

    name: str
    requests: int
    bounds: dict[str, float]  # "rpm", "tpm", "concurrency": seconds
    concurrency: int
    rpm: float | None
    tpm: float | None

    @property
    def binding(self) -> str:
        return max(self.bounds, key=lambda k: self.bounds[k])

    @property
    def seconds(self) -> float:
        return max(self.bounds.values(), default=0.0)


@dataclass(slots=True)
class Plan:
    job: str
    output: str
    variants: list[VariantPlan]
    targets: list[TargetPlan] = field(default_factory=list)
    bad_rows: int = 0  # input rows written failed (on_bad_line = "fail_row"), never sent
    calibrated_rows: int = 0  # earlier rows the estimate was calibrated on
    latency_s: float = ASSUMED_LATENCY_S
    latency_measured: bool = False
    budget_usd: float | None = None
    budget_per_variant: bool = False

    @property
    def unpriced(self) -> list[str]:
        return sorted({v.model for v in self.variants if v.price is None})


def _calibration(history: pa.Table) -> dict[tuple[str, str], int]:
    """Real prompt tokens of the earlier ok rows with usage, by (id, request fingerprint)."""
    real: dict[tuple[str, str], int] = {}
    cols = [history[c].to_pylist() for c in ("id", "request_fingerprint", "status", "prompt_tokens")]
    for rid, fp, status, tokens in zip(*cols, strict=True):
        if status == "ok" and tokens is not None and fp:
            real[(rid, fp)] = tokens
    return real


def _rows(spec: JobSpec) -> Iterator[Row]:
    source = open_source(spec.input)
    source.check()
    for batch in source.batches():
        yield from batch


def make_plan(spec: JobSpec, output: Path, *, fresh: bool = False, retry_failed: bool = True) -> Plan:
    """Count what a run of ``spec`` into ``output`` would send; sends nothing, writes nothing."""
    check_not_input(output, Path(spec.input.path))
    check_output_ours(output)
    history = earlier_rows(output) if not fresh else empty_history()
    if not fresh and len(history):
        previous = read_job_identity(output)
        if previous is not None and previous.get("job") != spec.name:
            raise OutputError(f"this output was written by another job ({previous.get('job')!r}); a run would "
                              "refuse it: choose another output, or plan with --fresh", path=output)
    key = SWEEP_KEY if spec.is_sweep else PLAIN_KEY
    index = load_index(output, include_failed=not retry_failed, key=key) if not fresh else None
    fanout = Fanout(spec)  # the run's own request builder: each variant's body, a seed per sample
    prices = job_prices(spec)
    names = [v.name for v in fanout.variants]
    before = spent_before(history, names) if len(history) else dict.fromkeys(names, 0.0)
    plans = {v.name: VariantPlan(v.name, v.model, v.target.name, prices[v.name], spent_before=before[v.name])
             for v in fanout.variants}
    real = _calibration(history)
    est_sum: dict[str, int] = {}
    real_sum: dict[str, int] = {}
    matched = 0
    bad = 0
    for row in _rows(spec):
        if row.error is not None:
            bad += 1
            continue
        for v, request in fanout.each(row, None):
            assert request is not None  # nothing is done without an index
            vp = plans[v.name]
            got = real.get((row.id, request.fingerprint))
            if got is not None:
                matched += 1
                est_sum[v.model] = est_sum.get(v.model, 0) + request.est_prompt_tokens
                real_sum[v.model] = real_sum.get(v.model, 0) + got
            if index is not None and (fanout.resume_key(row.id, v.name, request.sample), request.fingerprint) in index:
                vp.rows_done += request.choices  # the resume index holds its key and fingerprint: a run skips it
                continue
            vp.rows_to_send += request.choices  # sample_mode = "n": one request, n rows
            vp.requests_to_send += 1
            vp.prompt_tokens_raw += request.est_prompt_tokens
            vp.output_ceiling += answer_tokens(request.body)
    _expected(plans, history, est_sum, real_sum)
    plan = Plan(spec.name, str(output), list(plans.values()), bad_rows=bad, calibrated_rows=matched,
                budget_usd=spec.limits.budget_usd, budget_per_variant=spec.limits.budget_per_variant)
    _latency(plan, history)
    plan.targets = _targets(spec, plan)
    return plan


def _expected(plans: dict[str, VariantPlan], history: pa.Table, est: dict[str, int], real: dict[str, int]) -> None:
    """Calibration per model and the expected answer length per variant, from the earlier output."""
    completions: dict[str, list[int]] = {}
    for name, status, tokens in zip(history["variant"].to_pylist(), history["status"].to_pylist(),
                                    history["completion_tokens"].to_pylist(), strict=True):
        if status == "ok" and tokens is not None:
            completions.setdefault(name, []).append(tokens)
    for vp in plans.values():
        if est.get(vp.model):
            vp.calibration = real[vp.model] / est[vp.model]
        seen = completions.get(vp.name)
        if seen:
            vp.mean_completion = math.fsum(seen) / len(seen)


def _latency(plan: Plan, history: pa.Table) -> None:
    values = sorted(v for v, s in zip(history["latency_s"].to_pylist(), history["status"].to_pylist(), strict=True)
                    if v is not None and s == "ok")
    if values:
        plan.latency_s = values[len(values) // 2]
        plan.latency_measured = True


def _targets(spec: JobSpec, plan: Plan) -> list[TargetPlan]:
    """Per target: requests over RPM, tokens (prompt + max_tokens * n, as the limiter reserves)
    over TPM, and requests x latency over the concurrency."""
    by_name = {v.target.name: v.target for v in spec.variants()}
    out = []
    for name, target in by_name.items():
        vps = [vp for vp in plan.variants if vp.target == name]
        requests = sum(vp.requests_to_send for vp in vps)
        tokens = sum(vp.prompt_tokens + vp.output_ceiling for vp in vps)
        rpm = target.rpm if target.rpm is not None else spec.limits.rpm
        tpm = target.tpm if target.tpm is not None else spec.limits.tpm
        concurrency = target.concurrency or spec.limits.concurrency
        bounds = {"concurrency": requests * plan.latency_s / concurrency}
        if rpm:
            bounds["rpm"] = requests / rpm * 60
        if tpm:
            bounds["tpm"] = tokens / tpm * 60
        out.append(TargetPlan(name, requests, bounds, concurrency, rpm, tpm))
    return out
