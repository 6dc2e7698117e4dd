"""The worker actor of a job on Ray: promptmill's own pipeline on each block of rows.

Ray Data hands :class:`BlockWorker` (a callable class in an actor pool, through
``map_batches``) one Arrow block at a time. For each block the worker runs what
the local runner runs (:func:`batch.runner.run_lanes`): the job's feeder, which
skips rows already finished (the resume index, loaded once per worker and
brought up to date with the other workers' parts before each block, so a block
Ray hands out again after a worker was killed sends only what is not done),
one lane of workers a target with its share of the concurrency (the same
client, retries and row outcomes; every variant and sample of a sweep), and the
flusher, which writes durable parts through the output store under a run
number of the worker's own (so two workers never write the same file). The
block's rows are on disk before it is handed back; what it hands back is the
block's :class:`~batch.summary.Summary`.

The rate limits, the budget and the stops are the job's one
:class:`~batch.engines.ray_limiter.ClusterLimiter` actor: each lane leases a few
admissions at a time, a budget reserves each row there, and a few times a
second the worker reports what it did (rows, tokens, cost: the driver's
progress) and learns of stops. A fatal answer stops this worker at once and,
through that actor, every other one (a target's fatal answer: that target's
variants only); a stopped worker passes the blocks still coming without sending
anything.

No row raises out of a worker: every row it takes ends ok or failed, as on one machine.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pyarrow as pa

from batch.engines.ray_limiter import LeasedLimiter, State
from batch.engines.ray_money import LeasedLedger, MoneyArgs
from batch.errors import APIStatusError, BudgetReached, JobStopped
from batch.job import Job
from batch.progress import Progress
from batch.records import Row
from batch.runner import RunOptions, lane_concurrency, run_lanes
from batch.sources import open_source
from batch.sources.base import FileSource
from batch.sources.jsonl import JsonlSource
from batch.sources.parquet import arrow_rows
from batch.spec import JobSpec
from batch.store import OutputLock, OutputStore, PartWriter, load_index
from batch.store.parts import part_files
from batch.structured import OutputFormat
from batch.summary import ModelTotals, Summary

__all__ = ["BlockWorker", "merge_summary", "summary_of"]

log = logging.getLogger(__name__)

_REPORT_EVERY_S = 0.2  # how often a worker reports to the limiter actor and learns of a stop


class _Block:
    """One block's rows as a source the job's feeder reads (:class:`batch.sources.Source`)."""

    def __init__(self, rows: list[Row], path: Path, schema: pa.Schema) -> None:
        self._rows = rows
        self.path = path
        self.num_rows: int | None = len(rows)
        self.passthrough_schema = schema

    def check(self) -> None:
        return None

    def batches(self, batch_size: int = 1024) -> Any:
        return iter([self._rows])


class _Tally(Progress):
    """The block's rows done and its cost, counted for the worker's next report (nothing shown
    here), and the stops already told to the actor."""

    def __init__(self) -> None:
        super().__init__(None, enabled=False)
        self.sent = [0, 0, 0, 0]
        self.cost = 0.0
        self.told: set[int] = set()

    def delta(self, summary: Summary) -> tuple[list[int], float]:
        now = [self.done, self.failed, self.tokens, self.skipped]
        rows = [a - b for a, b in zip(now, self.sent, strict=True)]
        cost = summary.total().cost_usd
        added = cost - self.cost
        self.sent, self.cost = now, cost
        return rows, added


def _fatal(job: Job) -> JobStopped | None:
    """The job's stop, unless it is the budget's (the actor's own to tell)."""
    fatal = job.fatal
    return fatal if isinstance(fatal, JobStopped) and not isinstance(fatal, BudgetReached) else None


class BlockWorker:
    """The callable class of ``map_batches``: one per actor, called once a block."""

    def __init__(self, spec: JobSpec, output: str, schema: pa.Schema, fmt: OutputFormat | None, base_url: str,
                 limiter: str, namespace: str, workers: int, money: MoneyArgs, keep_failed: bool,
                 key: tuple[str, ...]) -> None:
        import ray

        # the limits are the cluster limiter's; this worker's share (1 / workers) of each target's
        # concurrency is its own (run_lanes divides it)
        limits = msgspec.structs.replace(spec.limits, rpm=None, tpm=None)
        self.spec = msgspec.structs.replace(spec, limits=limits)
        self.share = workers
        self.output = Path(output)
        self.fmt = fmt
        self.money = money
        self.key = key
        self.actor = ray.get_actor(limiter, namespace=namespace)
        get: Any = ray.get  # Ray's stubs type a get of one ref as a list
        self.run = int(get(self.actor.run_number.remote()))  # this worker's name at the actor, and its parts'
        self.seen: set[Path] = set(part_files(self.output))  # read into the index below (or after it: read again, harmless)
        index = load_index(self.output, include_failed=keep_failed, key=key)
        parts = PartWriter(self.output, schema, self.run)
        # the driver holds the output's lock; this store only writes parts (never assembles or closes)
        self.store: OutputStore = OutputStore(self.output, schema, OutputLock(self.output), index, parts, key)
        self.source: FileSource = open_source(self.spec.input)  # the input's columns, to make rows of a block
        self.api_key: str | None = os.environ.get(spec.api.api_key_env) or None  # from the runtime env's env_vars
        self.base_url: str = base_url
        self.stopped: str | None = None

    def __call__(self, block: pa.Table) -> pa.Table:
        summary = Summary(job=self.spec.name, output=str(self.output), by_variant=self.spec.is_sweep)
        if self.stopped is None:
            import ray

            get: Any = ray.get  # Ray's stubs type a get of one ref as a list
            state: State = get(self.actor.state.remote())
            self._catch_up()
            rows = self._rows(block)
            anyio.run(self._block, rows, summary, state)
        return pa.table({"summary": pa.array([pickle.dumps(summary_of(summary))], pa.binary())})

    def _rows(self, block: pa.Table) -> list[Row]:
        """A block's rows, made as on one machine: Parquet from its columns, JSONL from its lines."""
        if isinstance(self.source, JsonlSource):
            lines = [line.encode() for line in block.column("text").to_pylist()]
            return [row for rows in self.source.rows_of(lines, max(1, len(lines))) for row in rows]
        return arrow_rows(self.source, block, 0)

    def _catch_up(self) -> None:
        """Add to the resume index what the other workers wrote since it was loaded (a block handed
        out again after its worker was killed: the rows that worker finished are not sent again)."""
        new = [p for p in part_files(self.output) if p not in self.seen]
        self.seen.update(new)
        self.store.index.add(new, self.key)

    async def _block(self, rows: list[Row], summary: Summary, state: State) -> None:
        spec = self.spec
        opts = RunOptions(handle_signals=False, progress=False, base_url=self.base_url)
        tally = _Tally()
        money = LeasedLedger(self.actor, self.run, self.money, state[2])
        job = Job(spec, opts, self.store, summary, tally, self.api_key, money=money, fmt=self.fmt)
        lanes = [LeasedLimiter(self.actor, self.run, lane, lane_concurrency(spec, target, self.share),
                               lambda s: _apply(job, s)) for lane, target in enumerate(job.fanout.targets)]
        _apply(job, state)
        if job.stopping or (money.reached and not money.per_variant):
            self.stopped = str(job.fatal) if job.fatal is not None else "stopped"
            return
        source = _Block(rows, self.source.path, self.source.passthrough_schema)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, job, lanes, money, tally)
                try:
                    await run_lanes(job, source, self.api_key, lambda lane: lanes[lane], self.share)
                except JobStopped:
                    pass  # the stop is the actor's to tell; what finished is flushed below
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await job.flush()  # the block's rows are durable before Ray hears it is done
            for lane in lanes:
                lane.give_back()
            await self._report(job, lanes, money, tally)
        stop = _fatal(job)
        if stop is not None or job.stopping:  # a stop, the budget or the driver's signal: later blocks pass
            self.stopped = str(stop) if stop is not None else "stopped"

    async def _watch(self, job: Job, lanes: list[LeasedLimiter], money: LeasedLedger, tally: _Tally) -> None:
        """Report to the limiter actor a few times a second; tell it of a stop here, learn of one elsewhere."""
        while True:
            await anyio.sleep(_REPORT_EVERY_S)
            await self._report(job, lanes, money, tally)

    async def _report(self, job: Job, lanes: list[LeasedLimiter], money: LeasedLedger, tally: _Tally) -> None:
        actor = self.actor
        stop = _fatal(job)
        if stop is not None and -1 not in tally.told:
            tally.told.add(-1)
            await actor.stop.remote(str(stop), stop.exit_code)
        for lane, exc in job.lane_fatal.items():
            if lane not in tally.told:
                tally.told.add(lane)
                await actor.stop_lane.remote(lane, (exc.message, exc.http_status, exc.code, job.lane_stopped_text(lane)))
        reports = [r for lane in lanes for r in lane.take_reports()]
        rows, cost = tally.delta(job.summary)
        state = await actor.report.remote(self.run, reports, rows, cost, money.take_settles())
        _apply(job, state)


def _apply(job: Job, state: State) -> None:
    """What the actor says of the job: its stop, targets stopped elsewhere, or the driver's signal
    (send nothing more; the requests in flight finish and are kept)."""
    fatal, lanes, _, draining = state
    if draining and not job.stopping:
        job.stop_feeding()
    for lane, (message, status, code, _line) in lanes.items():
        if lane not in job.lane_fatal:
            job.stop_lane(lane, APIStatusError(message, http_status=status, code=code))
    if fatal is not None and job.fatal is None:
        job.stop_now(None, fatal)


def summary_of(summary: Summary) -> dict[str, Any]:
    """What a block's summary adds to the job's, as plain values."""
    def totals(of: dict[str, ModelTotals]) -> dict[str, list[Any]]:
        return {m: [getattr(t, f.name) for f in fields(ModelTotals)] for m, t in of.items()}

    return {"rows_skipped": summary.rows_skipped, "errors": dict(summary.errors),
            "latencies": summary.latencies.tobytes(), "models": totals(summary.models),
            "variants": totals(summary.variants), "structured": dict(summary.structured)}


def merge_summary(into: Summary, part: dict[str, Any]) -> None:
    """Add a block's summary (:func:`summary_of`) to the job's."""
    into.rows_skipped += part["rows_skipped"]
    for code, n in part["errors"].items():
        into.errors[code] = into.errors.get(code, 0) + n
    into.latencies.frombytes(part["latencies"])
    for name, (asked, never) in part["structured"].items():
        counts = into.structured.setdefault(name, [0, 0])
        counts[0] += asked
        counts[1] += never
    for of, found in ((into.models, part["models"]), (into.variants, part["variants"])):
        for name, values in found.items():
            totals = of.setdefault(name, ModelTotals())
            for f, value in zip(fields(ModelTotals), values, strict=True):
                setattr(totals, f.name, getattr(totals, f.name) + value)
