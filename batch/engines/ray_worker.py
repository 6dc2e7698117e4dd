"""The worker actor of a job on Ray: promptmill's own pipeline on each block of rows.

Ray Data hands :class:`BlockWorker` (a callable class in an actor pool, through
``map_batches``) one Arrow block at a time. For each block the worker runs what
the local runner runs (:mod:`batch.runner`): the job's feeder, which skips rows
an earlier run finished (the resume index, loaded once per worker), its share
of the job's concurrency as worker tasks (:class:`batch.worker.Workers`: the
same client, retries and row outcomes), and the flusher, which writes durable
parts through the output store under a run number of the worker's own (so two
workers never write the same file). The block's rows are on disk before it is
handed back; what it hands back is the block's :class:`~batch.summary.Summary`.

The rate budget is the job's one :class:`~batch.engines.ray_limiter.ClusterLimiter`
actor, leased a few admissions at a time. A fatal answer stops this worker at
once and, through that actor, every other one; a stopped worker passes the
blocks still coming without sending anything.

No row raises out of a worker: every row it takes ends ok or failed, as on one machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pyarrow as pa

from batch.engines.ray_limiter import LeasedLimiter
from batch.job import Job
from batch.progress import Progress
from batch.records import Request, Row
from batch.runner import RunOptions, _lane, timeouts_of
from batch.sources import open_source
from batch.sources.base import FileSource
from batch.sources.parquet import arrow_rows
from batch.spec import JobSpec
from batch.store import PLAIN_KEY, OutputLock, OutputStore, PartWriter, load_index
from batch.summary import ModelTotals, Summary
from batch.worker import Workers

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


class BlockWorker:
    """The callable class of ``map_batches``: one per actor, called once a block."""

    def __init__(self, spec: JobSpec, output: str, schema: pa.Schema, base_url: str, limiter: str,
                 namespace: str, concurrency: int, keep_failed: bool) -> None:
        import ray

        # the limits are the cluster limiter's; this worker's share of the job's concurrency is its own
        limits = msgspec.structs.replace(spec.limits, concurrency=concurrency, rpm=None, tpm=None)
        self.spec = msgspec.structs.replace(spec, limits=limits)
        self.output = Path(output)
        self.actor = ray.get_actor(limiter, namespace=namespace)
        get: Any = ray.get  # Ray's stubs type a get of one ref as a list
        run = int(get(self.actor.run_number.remote()))
        index = load_index(self.output, include_failed=keep_failed, key=PLAIN_KEY)
        parts = PartWriter(self.output, schema, run)
        # the driver holds the output's lock; this store only writes parts (never assembles or closes)
        self.store: OutputStore = OutputStore(self.output, schema, OutputLock(self.output), index, parts, PLAIN_KEY)
        self.source: FileSource = open_source(self.spec.input)  # the input's columns, to make rows of a block
        self.api_key: str | None = os.environ.get(spec.api.api_key_env) or None  # from the runtime env's env_vars
        self.base_url: str = base_url
        self.stopped: str | None = None

    def __call__(self, block: pa.Table) -> pa.Table:
        summary = Summary(job=self.spec.name, output=str(self.output))
        if self.stopped is None:
            rows = arrow_rows(self.source, block, 0)
            anyio.run(self._block, rows, summary)
        return pa.table({"summary": pa.array([pickle.dumps(summary_of(summary))], pa.binary())})

    async def _block(self, rows: list[Row], summary: Summary) -> None:
        spec = self.spec
        opts = RunOptions(handle_signals=False, progress=False, base_url=self.base_url)
        job = Job(spec, opts, self.store, summary, Progress(None, enabled=False), self.api_key)
        leased = LeasedLimiter(self.actor, spec.limits.concurrency, lambda stop: job.stop_now(None, stop))
        concurrency = spec.limits.concurrency
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as outer:
            target = job.fanout.targets[0]
            client, _, policy = await _lane(job, target, timeouts_of(spec), self.api_key, stack, leased)
            workers = Workers(job, client, leased, policy)
            outer.start_soon(job.flush_forever)
            outer.start_soon(self._watch, job, leased)
            async with anyio.create_task_group() as tg:
                job.workers_scope = tg.cancel_scope
                send, receive = anyio.create_memory_object_stream[Request](max(2 * concurrency, 64))
                async with receive:
                    for _ in range(concurrency):
                        tg.start_soon(workers.work, receive.clone())
                source = _Block(rows, self.source.path, self.source.passthrough_schema)
                tg.start_soon(job.feed, source, [send])
            outer.cancel_scope.cancel()
        await job.flush()  # the block's rows are durable before Ray hears it is done
        await leased.close()
        if job.fatal is not None:
            self.stopped = str(job.fatal)
            await self.actor.stop.remote(self.stopped)

    async def _watch(self, job: Job, leased: LeasedLimiter) -> None:
        """Report to the limiter actor now and then; tell it of a stop here, learn of one elsewhere."""
        told = False
        while True:
            await anyio.sleep(_REPORT_EVERY_S)
            if job.fatal is not None and not told:
                told = True
                await self.actor.stop.remote(str(job.fatal))
            stop = await leased.report()
            if stop is not None and job.fatal is None:
                job.stop_now(None, stop)


def summary_of(summary: Summary) -> dict[str, Any]:
    """What a block's summary adds to the job's, as plain values."""
    return {"rows_skipped": summary.rows_skipped, "errors": dict(summary.errors),
            "latencies": summary.latencies.tobytes(),
            "models": {m: [getattr(t, f.name) for f in fields(ModelTotals)] for m, t in summary.models.items()}}


def merge_summary(into: Summary, part: dict[str, Any]) -> None:
    """Add a block's summary (:func:`summary_of`) to the job's."""
    into.rows_skipped += part["rows_skipped"]
    for code, n in part["errors"].items():
        into.errors[code] = into.errors.get(code, 0) + n
    into.latencies.frombytes(part["latencies"])
    for model, values in part["models"].items():
        totals = into.models.setdefault(model, ModelTotals())
        for f, value in zip(fields(ModelTotals), values, strict=True):
            setattr(totals, f.name, getattr(totals, f.name) + value)
