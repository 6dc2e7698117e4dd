"""A :class:`~batch.plan.Plan` as text for a person and as JSON for a scheduler."""

from __future__ import annotations

import math
from typing import Any

from batch.plan import Plan, VariantPlan

__all__ = ["ESTIMATOR", "plan_dict", "plan_text"]

ESTIMATOR = (
    "estimated, no tokenizer: characters / 4, plus 4 a chat message and 3 for the reply "
    "(the limiter's estimator, batch/tokens.py)"
)


def _sum(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else math.fsum(v for v in values if v is not None)


def _variant(vp: VariantPlan) -> dict[str, Any]:
    return {
        "name": vp.name, "model": vp.model, "target": vp.target,
        "rows_to_send": vp.rows_to_send, "rows_done": vp.rows_done, "requests_to_send": vp.requests_to_send,
        "prompt_tokens_estimated": vp.prompt_tokens,
        "prompt_tokens_calibration": None if vp.calibration is None else round(vp.calibration, 4),
        "output_tokens_ceiling": vp.output_ceiling,
        "output_tokens_expected": vp.output_expected,
        "priced": vp.price is not None,
        "cost_ceiling_usd": _round(vp.cost_ceiling),
        "cost_expected_usd": _round(vp.cost_expected),
        "cost_in_output_usd": _round(vp.spent_before),
    }


def _round(usd: float | None) -> float | None:
    return None if usd is None else round(usd, 8)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON types: per variant, totals, time per target, how the estimates were made."""
    vs = plan.variants
    calibrated = any(v.calibration is not None for v in vs)
    total = {
        "rows_to_send": sum(v.rows_to_send for v in vs),
        "rows_done": sum(v.rows_done for v in vs),
        "prompt_tokens_estimated": sum(v.prompt_tokens for v in vs),
        "output_tokens_ceiling": sum(v.output_ceiling for v in vs),
        "output_tokens_expected": _sum([v.output_expected for v in vs]),
        "cost_ceiling_usd": _round(_sum([v.cost_ceiling for v in vs])),
        "cost_expected_usd": _round(_sum([v.cost_expected for v in vs])),
        "cost_in_output_usd": _round(math.fsum(v.spent_before for v in vs)),
    }
    seconds = max((t.seconds for t in plan.targets), default=0.0)
    doc: dict[str, Any] = {
        "job": plan.job,
        "output": plan.output,
        "sent": 0,
        "bad_rows": plan.bad_rows,
        "variants": [_variant(v) for v in vs],
        "total": total,
        "unpriced_models": plan.unpriced,
        "estimates": {
            "prompt_tokens": ESTIMATOR + (
                f"; calibrated on the real usage of {plan.calibrated_rows:,} rows of the earlier output"
                if calibrated else "; not calibrated (no earlier output of this job with usage)"),
            "output_tokens_expected": "mean completion tokens of the earlier output's ok rows"
            if total["output_tokens_expected"] is not None else "unknown: no earlier output with usage",
            "latency_s": round(plan.latency_s, 4),
            "latency": "median of the earlier output's ok rows" if plan.latency_measured else "assumed",
        },
        "time": {
            "lower_bound_s": round(seconds, 3),
            "targets": [{"target": t.name, "requests": t.requests, "binding": t.binding,
                         "bounds_s": {k: round(v, 3) for k, v in t.bounds.items()},
                         "rpm": t.rpm, "tpm": t.tpm, "concurrency": t.concurrency} for t in plan.targets],
        },
        "budget": None,
    }
    if plan.budget_usd is not None:
        spent = total["cost_in_output_usd"] or 0.0
        doc["budget"] = {
            "budget_usd": plan.budget_usd, "per_variant": plan.budget_per_variant,
            "spent_usd": spent, "left_usd": round(max(plan.budget_usd - spent, 0.0), 8),
            "ceiling_fits": total["cost_ceiling_usd"] is not None
            and spent + total["cost_ceiling_usd"] <= plan.budget_usd,
        }
    return doc


def _usd(usd: float | None) -> str:
    return "unknown" if usd is None else f"${usd:,.6f}"


def _tokens(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def plan_text(plan: Plan) -> str:
    """A few aligned lines per variant, then the totals, the time and how each figure was made."""
    d = plan_dict(plan)
    lines = [f"promptmill plan: job '{plan.job}' (nothing sent)", f"  output    {plan.output}"]
    rows = list(d["variants"])
    if len(rows) > 1:
        rows.append({"name": "total", **d["total"], "priced": not plan.unpriced})
    for v in rows:
        price = "" if v["priced"] else "  (no price)"
        lines.append(f"  {v['name']}{price}")
        lines.append(f"    rows      {v['rows_to_send']:,} to send, {v['rows_done']:,} already done (skipped)")
        lines.append(f"    tokens    {v['prompt_tokens_estimated']:,} prompt (estimated); output ceiling "
                     f"{v['output_tokens_ceiling']:,}, expected {_tokens(v['output_tokens_expected'])}")
        lines.append(f"    cost      ceiling {_usd(v['cost_ceiling_usd'])}, expected {_usd(v['cost_expected_usd'])}"
                     + (f" (already in the output: {_usd(v['cost_in_output_usd'])})" if v["cost_in_output_usd"] else ""))
    if plan.bad_rows:
        lines.append(f"  bad rows  {plan.bad_rows:,} (written failed, never sent)")
    if plan.unpriced:
        lines.append(f"  no price  {', '.join(plan.unpriced)}: their cost is unknown (add [pricing.\"MODEL\"])")
    for t in d["time"]["targets"]:
        bounds = ", ".join(f"{k} {v:,.1f} s" for k, v in t["bounds_s"].items())
        lines.append(f"  time      at least {max(t['bounds_s'].values()):,.1f} s on {t['target']}: "
                     f"{t['binding']} binds ({bounds})")
    est = d["estimates"]
    lines.append(f"  estimates prompt tokens {est['prompt_tokens']}")
    lines.append(f"            latency {est['latency_s']:.3f} s ({est['latency']}); "
                 f"expected output: {est['output_tokens_expected']}")
    if d["budget"] is not None:
        b = d["budget"]
        lines.append(f"  budget    ${b['budget_usd']:,.6f}, ${b['spent_usd']:,.6f} already spent, "
                     f"${b['left_usd']:,.6f} left; the ceiling " + ("fits" if b["ceiling_fits"] else
                                                                   "does not fit: the run may stop at the budget"))
    return "\n".join(lines)
