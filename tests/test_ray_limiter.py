"""The cluster's limiter actor and the workers' leases of it, without Ray.

:class:`ClusterLimiter` is a plain class Ray runs as an actor; here the workers'
``actor.method.remote(...)`` calls reach it directly (:class:`Direct`), so the
money, the stops and a worker lost mid-block are checked in one event loop, fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import anyio
import pytest

from batch.budget import Ledger
from batch.engines.ray_limiter import ClusterLimiter, LeasedLimiter, State
from batch.engines.ray_money import LeasedLedger, MoneyArgs
from batch.pricing import Price

PRICE = Price(1.0, 2.0)  # USD per million tokens


class _Done:
    """The result of a call already made, awaitable as a Ray object reference is."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator: awaiting it returns at once


class Direct:
    """Stands for a Ray actor handle: ``handle.method.remote(*args)`` calls ``method`` on the object."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.actor, name)

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                result = method(*args)
                return result if inspect.isawaitable(result) else _Done(result)

        return Remote


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def money(limit: float | None, variants: tuple[str, ...] = ("v",), per_variant: bool = False) -> MoneyArgs:
    return MoneyArgs.of(Ledger(limit, dict.fromkeys(variants, PRICE), per_variant=per_variant))


def actor(limit: float | None = None, clock: Clock | None = None, **kw: Any) -> ClusterLimiter:
    return ClusterLimiter([(None, None)], 1, money(limit, **kw), clock=clock or Clock())


def test_the_money_the_actor_is_given_is_what_the_driver_opened() -> None:
    prices = {"a": PRICE, "b": PRICE}
    one = Ledger(1.0, prices, spent_before={"a": 0.25, "b": 0.5})
    assert MoneyArgs.of(one).ledger().spent == pytest.approx(0.75)
    shares = Ledger(1.0, prices, per_variant=True, spent_before={"a": 0.25, "b": 0.5})
    rebuilt = MoneyArgs.of(shares).ledger()
    assert (rebuilt.pools["a"].spent, rebuilt.pools["b"].spent, rebuilt.per_variant) == (0.25, 0.5, True)


async def test_workers_reserving_together_never_pass_the_budget() -> None:
    cluster = actor(limit=1.0)
    handle = Direct(cluster)
    granted: list[float] = []

    async def worker(run: int) -> None:
        ledger = LeasedLedger(handle, run, money(1.0), [])
        for _ in range(20):
            hold = await ledger.reserve("v", 0.03)
            if hold is None:
                return
            granted.append(hold.usd)
            await anyio.sleep(0)
            ledger.settle(hold, 0.02)  # the answer cost less than its worst case
            cluster.settle(run, ledger.take_settles())

    async with anyio.create_task_group() as tg:
        for run in range(4):
            tg.start_soon(worker, run)
    figures, reached, line = cluster.money()
    assert reached and line.startswith("budget reached")
    assert figures["spent_usd"] <= 1.0
    # every reservation that fitted was granted: the spent money is 0.02 a row, up to the budget
    assert figures["spent_usd"] == pytest.approx(0.02 * len(granted))
    assert len(granted) >= 33  # (1.0 - 0.03) / 0.02 + 1: room was freed by cheaper answers
    assert cluster.state()[2] == ["v"]  # and every worker learns the budget is closed


async def test_a_worker_lost_holding_reservations_does_not_hold_the_others_up() -> None:
    clock = Clock()
    cluster = actor(limit=0.1, clock=clock)
    handle = Direct(cluster)
    lost = LeasedLedger(handle, 1, money(0.1), [])
    assert await lost.reserve("v", 0.08) is not None  # then its process is killed: it never settles
    alive = LeasedLedger(handle, 2, money(0.1), [])
    answer: list[object] = []

    async def waiting() -> None:
        answer.append(await alive.reserve("v", 0.05))  # does not fit while the lost one holds 0.08

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiting)
        await anyio.wait_all_tasks_blocked()
        assert answer == []
        clock.now = 30.0  # the lost worker has been silent past the limit
        cluster.report(2, [])
        with anyio.fail_after(1):
            while not answer:
                await anyio.sleep(0.01)
    # its reservation counts as spent at its worst case (it may have been paid): 0.05 no longer fits
    assert answer == [None]
    assert cluster.money()[0]["spent_usd"] == pytest.approx(0.08)
    assert cluster.stats()["workers_lost"] == 1


async def test_admissions_a_lost_worker_leased_are_given_back() -> None:
    clock = Clock()
    cluster = ClusterLimiter([(600.0, None)], 1, money(None), clock=clock)
    handle = Direct(cluster)
    states: list[State] = []
    lease = LeasedLimiter(handle, 7, 0, 8, states.append)
    await lease.acquire(10)
    assert cluster.stats()["held"] == 2  # a lease of two admissions when a limit paces them
    clock.now = 30.0
    cluster.report(8, [])
    assert cluster.stats() == {"requests": 2, "rate_limited": 0, "held": 0, "workers_lost": 1}


async def test_a_targets_stop_reaches_every_worker_and_the_jobs_stop_too() -> None:
    cluster = ClusterLimiter([(None, None), (None, None)], 1, money(None))
    handle = Direct(cluster)
    cluster.stop_lane(1, ("bad key", 401, None, "target b (v2): the API key was refused (401)"))
    states: list[State] = []
    lane = LeasedLimiter(handle, 3, 1, 4, states.append)
    with anyio.move_on_after(0.2) as scope:
        await lane.acquire(5)  # a stopped target's lane gets no admission: it waits to be cancelled
    assert scope.cancelled_caught
    assert states[-1][1] == {1: ("bad key", 401, None, "target b (v2): the API key was refused (401)")}
    cluster.stop("the quota is spent", 3)
    assert cluster.stopped() == ("the quota is spent", 3, {1: "target b (v2): the API key was refused (401)"})
    assert cluster.report(3, [])[0] == "the quota is spent"


def test_progress_adds_up_every_workers_reports() -> None:
    cluster = actor()
    cluster.report(1, [], [10, 1, 300, 5], 0.25)
    cluster.report(2, [], [20, 0, 600, 0], 0.5)
    p = cluster.progress()
    assert (p["done"], p["failed"], p["tokens"], p["skipped"]) == (30, 1, 900, 5)
    assert p["spent"] == pytest.approx(0.75) and p["limit"] is None
