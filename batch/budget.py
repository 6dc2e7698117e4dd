"""Money held by reservation: what a job has spent, what its requests in flight may still cost,
and, with a budget, what is left.

Before a row is sent its worst case is reserved (:func:`worst_case`: estimated prompt
tokens at the input price plus ``max_tokens * n`` at the output price); the answer settles
it at its real cost (a row without usage at its reservation, the worst case; a failed row
at nothing). A row whose reservation does not fit waits while rows in flight may still
free room, first come first served; once nothing is in flight and it still does not fit,
the pool is closed: that row and every later one of the pool are not sent.

So with prices known and usage reported, spent never passes the budget, except by a
prompt longer than its estimate: at most that error, at the input price, on the rows in
flight when the last one was admitted (their answers cannot pass ``max_tokens``).

One :class:`Ledger` a job; one pool for the whole job, or one a variant with
``budget_per_variant`` (each variant its own share of the budget).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import orjson

from batch.errors import UsageError
from batch.pricing import Price, PriceTable
from batch.store.history import earlier_rows
from batch.tokens import answer_tokens

if TYPE_CHECKING:
    import pyarrow as pa

    from batch.spec import JobSpec

__all__ = ["Hold", "Ledger", "Pool", "job_prices", "open_ledger", "spent_before", "uncosted_before", "worst_case"]

log = logging.getLogger(__name__)


def worst_case(price: Price, prompt_tokens: int, answer_tokens: int) -> float:
    """Dollars a request may cost at most: its (estimated) prompt at the dearer of the input
    and cached prices, and every answer token it may take at the output price."""
    cached = price.input if price.cached_input is None else price.cached_input
    return (prompt_tokens * max(price.input, cached) + answer_tokens * price.output) / 1_000_000


@dataclass(slots=True)
class Pool:
    """One budget (or none: ``limit`` is None, and the pool only counts)."""

    limit: float | None
    spent: float = 0.0  # settled: this run's real costs, plus what the output held before
    spent_before: float = 0.0  # of ``spent``: the output's cost from earlier runs
    reserved: float = 0.0  # rows in flight, at their worst case
    in_flight: int = 0
    closed: bool = False  # the budget is reached: nothing more is sent
    lock: anyio.Lock = field(default_factory=anyio.Lock)  # first come, first served
    changed: anyio.Event = field(default_factory=anyio.Event)

    def fits(self, usd: float) -> bool:
        return self.limit is None or self.spent + self.reserved + usd <= self.limit

    @property
    def left(self) -> float | None:
        return None if self.limit is None else max(self.limit - self.spent - self.reserved, 0.0)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


@dataclass(frozen=True, slots=True)
class Hold:
    """One row's reservation: settle or release it exactly once."""

    pool: Pool
    usd: float


class Ledger:
    """The job's money: one pool, or one a variant (``per_variant``)."""

    def __init__(self, limit_usd: float | None, variants: Mapping[str, Price | None], *,
                 per_variant: bool = False, spent_before: Mapping[str, float] | None = None) -> None:
        self.check(limit_usd, variants)
        self.limit = limit_usd
        self.per_variant = per_variant and len(variants) > 1 and limit_usd is not None
        self.prices = dict(variants)
        before = dict(spent_before or {})
        if self.per_variant:
            assert limit_usd is not None
            share = limit_usd / len(variants)
            self.pools = {name: Pool(share) for name in variants}
            for name, usd in before.items():
                pool = self.pools.get(name)
                if pool is not None:
                    pool.spent = pool.spent_before = usd
        else:
            one = Pool(limit_usd)
            one.spent = one.spent_before = math.fsum(before.values())
            self.pools = dict.fromkeys(variants, one)
        self.rows_without_usage = 0  # settled at their reservation
        self.without_usage_usd = 0.0

    @staticmethod
    def check(limit_usd: float | None, variants: Mapping[str, Price | None]) -> None:
        """Refuse a budget when a variant has no price: its cost could not be bounded."""
        unpriced = sorted(name for name, price in variants.items() if price is None)
        if limit_usd is not None and unpriced:
            raise UsageError(
                f"a budget needs a price for every variant's model, and {', '.join(repr(n) for n in unpriced)} "
                "has none: its cost cannot be bounded; add [pricing.\"MODEL\"] to the job file (USD per "
                "million tokens), or run without a budget"
            )

    def _distinct(self) -> list[Pool]:
        return list({id(p): p for p in self.pools.values()}.values())

    @property
    def spent(self) -> float:
        return math.fsum(p.spent for p in self._distinct())

    @property
    def reserved(self) -> float:
        return math.fsum(p.reserved for p in self._distinct())

    @property
    def left(self) -> float | None:
        if self.limit is None:
            return None
        return math.fsum(p.left or 0.0 for p in self._distinct())

    @property
    def reached(self) -> bool:
        """The budget (or a variant's share of it) stopped rows from being sent."""
        return any(p.closed for p in self._distinct())

    def closed(self, variant: str) -> bool:
        return self.pools[variant].closed

    async def reserve(self, variant: str, usd: float) -> Hold | None:
        """Reserve ``usd`` for one row of ``variant``; None when the budget is reached (do not send it)."""
        pool = self.pools[variant]
        if pool.limit is None:
            return self.held(variant, usd)
        async with pool.lock:
            while not pool.closed and not pool.fits(usd):
                if pool.in_flight == 0:
                    pool.closed = True  # nothing in flight can free room: this row never fits
                    break
                await pool.changed.wait()
            if pool.closed:
                return None
            return self.held(variant, usd)

    def held(self, variant: str, usd: float) -> Hold:
        """``usd`` held for one row of ``variant``, without a check: it fits (or a Ray worker's
        mirror of what the job's actor granted)."""
        pool = self.pools[variant]
        pool.reserved += usd
        pool.in_flight += 1
        return Hold(pool, usd)

    def settle(self, hold: Hold, usd: float | None) -> None:
        """The row's answer came: its real cost; None (no usage) counts at the reservation."""
        if usd is None:
            usd = hold.usd
            self.rows_without_usage += 1
            self.without_usage_usd += usd
        self._end(hold, usd)

    def release(self, hold: Hold) -> None:
        """The row failed: nothing to pay."""
        self._end(hold, 0.0)

    def lost(self, hold: Hold) -> None:
        """The row's answer never came back (a Ray worker died): it may have been paid, so it counts
        as spent at its reservation, the worst case."""
        self._end(hold, hold.usd)

    def _end(self, hold: Hold, usd: float) -> None:
        pool = hold.pool
        pool.reserved = max(pool.reserved - hold.usd, 0.0)
        pool.in_flight -= 1
        pool.spent += usd
        pool._changed()

    def as_dict(self) -> dict[str, object]:
        """For the summary: the budget, what is spent (before this run too), and rows settled at their reservation."""
        before = math.fsum(p.spent_before for p in self._distinct())
        return {
            "budget_usd": self.limit, "per_variant": self.per_variant, "reached": self.reached,
            "spent_usd": round(self.spent, 8), "spent_before_usd": round(before, 8),
            "rows_without_usage": self.rows_without_usage,
            "without_usage_usd": round(self.without_usage_usd, 8),
        }

    def stop_text(self) -> str:
        """``budget reached ($X of $Y spent)``, per variant when each has its share."""
        if not self.per_variant:
            return f"budget reached (${self.spent:.6f} of ${self.limit:.6f} spent)"
        parts = [f"{name} ${p.spent:.6f} of ${p.limit:.6f}" for name, p in self.pools.items() if p.closed]
        return f"budget reached (${self.spent:.6f} of ${self.limit:.6f} spent; shares reached: {', '.join(parts)})"


def job_prices(spec: JobSpec) -> dict[str, Price | None]:
    """Each variant's price: its own, else the job's table (and the example table) by model."""
    table = PriceTable({m: Price(p.input, p.output, p.cached_input) for m, p in spec.pricing.items()})
    prices: dict[str, Price | None] = {}
    for v in spec.variants():
        if v.price is not None:
            prices[v.name] = Price(v.price.input, v.price.output, v.price.cached_input)
        else:
            prices[v.name] = table.get(v.model)
    return prices


def spent_before(history: pa.Table, variants: list[str]) -> dict[str, float]:
    """The cost already in the output, per variant (rows of a variant no longer asked count toward the first)."""
    spent = dict.fromkeys(variants, 0.0)
    for name, cost in zip(history["variant"].to_pylist(), history["cost_usd"].to_pylist(), strict=True):
        if cost:
            spent[name if name in spent else variants[0]] += cost
    return spent


def uncosted_before(history: pa.Table, spec: JobSpec, prices: Mapping[str, Price | None]) -> tuple[dict[str, float], int]:
    """The earlier ok rows with no cost in the output, at their worst case, per variant, and how many.

    A row without usage counts at its answer's ceiling (``max_tokens * n`` at the output price,
    from the row's ``params`` in a sweep, else its variant's or the job's); its prompt is not
    counted, as the output does not keep it. A row with usage but no price then is priced now.
    """
    variants = {v.name: v for v in spec.variants()}
    first = next(iter(variants))
    worst: dict[str, float] = {}
    rows = 0
    cols = [history[c].to_pylist() for c in ("variant", "status", "cost_usd", "params", "prompt_tokens",
                                             "completion_tokens")]
    for name, status, cost, params, prompt, completion in zip(*cols, strict=True):
        if status != "ok" or cost is not None:
            continue
        name = name if name in variants else first
        price = prices.get(name)
        if price is None:
            continue
        if prompt is None:  # no usage: the answer may have taken every token it was allowed
            asked = orjson.loads(params) if params else variants[name].params
            usd = worst_case(price, 0, answer_tokens(asked))
        else:
            usd = (prompt * price.input + (completion or 0) * price.output) / 1_000_000
        worst[name] = worst.get(name, 0.0) + usd
        rows += 1
    return worst, rows


def open_ledger(spec: JobSpec, output: Path) -> Ledger:
    """The job's ledger, with what ``output`` already cost (read after ``--fresh`` discarded it)."""
    prices = job_prices(spec)
    Ledger.check(spec.limits.budget_usd, prices)
    history = earlier_rows(output)
    before = spent_before(history, list(prices)) if history.num_rows else None
    worst, rows = uncosted_before(history, spec, prices) if history.num_rows else ({}, 0)
    if before is not None:
        for name, usd in worst.items():
            before[name] += usd
    ledger = Ledger(spec.limits.budget_usd, prices, per_variant=spec.limits.budget_per_variant, spent_before=before)
    if rows and spec.limits.budget_usd is not None:
        log.warning("%s rows already in the output have no known cost (no usage): the budget counts them at "
                    "their answer's ceiling, $%.6f in all", f"{rows:,}", math.fsum(worst.values()))
    ledger.rows_without_usage = rows
    ledger.without_usage_usd = math.fsum(worst.values())
    return ledger
