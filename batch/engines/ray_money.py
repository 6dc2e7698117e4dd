"""The job's money on Ray: one :class:`~batch.budget.Ledger` in the limiter actor, and the worker's way to it.

The driver opens the ledger as the local engine does (the budget, the prices, what
the output already cost) and hands the actor its description (:class:`MoneyArgs`).
With a budget, each worker's :class:`LeasedLedger` reserves every row's worst case
in the actor before the row is sent (one call a row: the budget is the cluster's,
so a reservation cannot be leased ahead) and settles it there with its next call
or report; without one, it only counts, and the cost reaches the actor with the
worker's reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch.budget import Hold, Ledger
from batch.pricing import Price

__all__ = ["LeasedLedger", "MoneyArgs", "Settle"]

# A settled reservation: (hold id in the actor, real cost or None for no usage, released: nothing paid)
Settle = tuple[int, float | None, bool]


@dataclass(frozen=True, slots=True)
class MoneyArgs:
    """What the actor needs to build the job's ledger (picklable: no locks)."""

    limit: float | None
    prices: dict[str, Price | None]
    per_variant: bool
    spent_before: dict[str, float]
    rows_without_usage: int
    without_usage_usd: float

    @classmethod
    def of(cls, ledger: Ledger) -> MoneyArgs:
        pools = ledger.pools
        if ledger.per_variant:
            before = {name: pool.spent_before for name, pool in pools.items()}
        else:  # one pool for every variant: its spending once
            first = next(iter(pools))
            before = {first: pools[first].spent_before}
        return cls(ledger.limit, dict(ledger.prices), ledger.per_variant, before,
                   ledger.rows_without_usage, ledger.without_usage_usd)

    def ledger(self) -> Ledger:
        ledger = Ledger(self.limit, self.prices, per_variant=self.per_variant, spent_before=self.spent_before)
        ledger.rows_without_usage = self.rows_without_usage
        ledger.without_usage_usd = self.without_usage_usd
        return ledger


class LeasedLedger(Ledger):
    """A worker's ledger: with a budget, reservations are the actor's; it mirrors them for the worker."""

    def __init__(self, actor: Any, worker: int, args: MoneyArgs, closed: list[str]) -> None:
        super().__init__(args.limit, args.prices, per_variant=args.per_variant)
        self._actor = actor
        self._worker = worker
        self._ids: dict[int, int] = {}  # id(hold): the actor's hold id
        self._settles: list[Settle] = []
        self._closed = set(closed)

    @property
    def reached(self) -> bool:
        return bool(self._closed)

    def closed(self, variant: str) -> bool:
        return variant in self._closed or (bool(self._closed) and not self.per_variant)

    async def reserve(self, variant: str, usd: float) -> Hold | None:
        if self.limit is None:
            return await super().reserve(variant, usd)
        if self.closed(variant):
            return None
        settles, self._settles = self._settles, []
        hid = await self._actor.reserve.remote(self._worker, variant, usd, settles)
        if hid is None:
            self._closed.add(variant)
            return None
        hold = self.held(variant, usd)
        self._ids[id(hold)] = hid
        return hold

    def settle(self, hold: Hold, usd: float | None) -> None:
        hid = self._ids.pop(id(hold), None)
        if hid is not None:
            self._settles.append((hid, usd, False))
        super().settle(hold, usd)

    def release(self, hold: Hold) -> None:
        hid = self._ids.pop(id(hold), None)
        if hid is not None:
            self._settles.append((hid, None, True))
        super().release(hold)

    def take_settles(self) -> list[Settle]:
        settles, self._settles = self._settles, []
        return settles
