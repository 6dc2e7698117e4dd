"""Wires the stages into one job: reader → builder → limiter → client (with retries) → output store.

The pipeline: open the output store (:mod:`batch.store`), feed, work, flush, finish.
One anyio task group holds a feeder (reads the input in a worker thread and
builds requests; :mod:`batch.job`), ``concurrency`` workers (:mod:`batch.worker`)
and a flusher. Between the feeder and the workers is a bounded memory object
stream, so the reader never runs more than a few batches ahead and memory stays
flat however large the input is. Workers hand each finished row to the store's
buffers; the flusher alone writes parts to disk (in a thread).

Stopping:

* a fatal answer (401, 402, 403, spent quota) cancels everything at once; the
  rows already finished are flushed and assembled, and :class:`JobStopped` is raised;
* so does an outage: no request has succeeded for ``retry.outage_s`` and the last
  rows (at least twice the concurrency) all failed in ways that are retried
  (connection errors, timeouts, 5xx; not 429, which the limiter waits out);
* an input whose size or modification time changed since the start (checked as each
  batch is read) stops feeding; requests in flight finish, and :class:`InputChanged`
  is raised (an :class:`InputError` when nothing was sent yet);
* the first SIGINT or SIGTERM stops feeding, lets requests in flight finish
  within ``grace_s``, then flushes and assembles; a second signal cancels at once,
  still keeping every finished row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec
import pyarrow as pa

from batch.budget import Ledger, job_prices, open_ledger
from batch.client import Client, Timeouts
from batch.errors import BudgetReached, DiskError, JobStopped, PromptmillError, UsageError
from batch.job import Job
from batch.limiter import Limiter
from batch.outputs import checked_output, finish_output, job_identity, job_schema, with_columns_read
from batch.progress import Progress
from batch.records import Request
from batch.retry import RetryPolicy, RetrySettings
from batch.sources import Source, open_source
from batch.sources.base import FileSource
from batch.spec import JobSpec, is_loopback
from batch.store import (
    PLAIN_KEY,
    SWEEP_KEY,
    OutputStore,
)
from batch.summary import Summary
from batch.variants import Target
from batch.worker import Workers

if TYPE_CHECKING:
    from batch.structured import OutputFormat

__all__ = ["Prepared", "RunOptions", "check_api", "lane_concurrency", "prepare", "run_job", "run_lanes"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunOptions:
    """How to run a job, beyond what the job spec says."""

    fresh: bool = False
    retry_failed: bool = True
    grace_s: float = 30.0
    progress: bool | None = None  # None: a bar when stderr is a terminal
    flush_rows: int | None = None  # None: the job's (see JobSpec.flush_rows)
    flush_s: float | None = None  # None: the job's output.flush_s
    handle_signals: bool = True
    transport: httpx.AsyncBaseTransport | None = None
    base_url: str | None = None  # instead of the job's api.base_url (the CLI's simulator for "simulator")
    date: date | None = None  # what {date} and {ds} in the output path stand for (None: today, UTC)
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], Any] = anyio.sleep
    # filled in by run_job for the caller (the CLI prints it)
    summary: Summary | None = field(default=None)
    exit_signal: int | None = None


def check_api(spec: JobSpec) -> str | None:
    """Find the API key, and refuse a job that would need one it lacks or send it in clear text."""
    env = spec.api.api_key_env
    key = os.environ.get(env) or None
    if spec.api.is_simulator:
        return key
    url = urlsplit(spec.api.base_url)  # the spec has checked it parses, with an http(s) scheme and a host
    host = url.hostname or ""
    loopback = is_loopback(host)
    if key is None and not loopback:
        raise UsageError(
            f"no API key: set the environment variable {env} (the job's api.api_key_env) "
            f"to your key for {host}"
        )
    if key is not None and url.scheme == "http" and not loopback and not spec.api.allow_insecure_http:
        raise UsageError(
            f"refusing to send the API key over plain http to {host}; use https, "
            "or set api.allow_insecure_http = true (--allow-insecure-http) if you mean it"
        )
    return key


def _base_url(spec: JobSpec, opts: RunOptions) -> str:
    """Where to send: ``opts.base_url`` (a simulator the caller started), else the job's."""
    if opts.base_url is not None:
        return opts.base_url
    if spec.api.is_simulator:
        raise UsageError(
            'api.base_url = "simulator" needs a simulator started for the job: run it with the '
            "promptmill command, or start batch.simulator.SimServer and pass RunOptions(base_url=...)"
        )
    return spec.api.base_url


def _first_promptmill_error(group: BaseExceptionGroup[BaseException]) -> PromptmillError | None:
    for exc in group.exceptions:
        if isinstance(exc, PromptmillError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_promptmill_error(exc)
            if found is not None:
                return found
    return None


def _release_memory() -> None:
    """Give back what Arrow's allocator keeps after a pass over a whole file (tens of MB on a million rows)."""
    pa.default_memory_pool().release_unused()


@dataclass(slots=True)
class Prepared:
    """A job checked and ready to open its output (:func:`prepare`), for either engine."""

    spec: JobSpec  # with the columns its scores and templates read passed through
    api_key: str | None
    base_url: str
    output: Path  # the Parquet output: the durable store
    input_seen: os.stat_result | None  # the input before it was read: a change from then on stops the job
    reader: FileSource
    identity: dict[str, Any]
    schema: pa.Schema
    fmt: OutputFormat | None
    summary: Summary
    key: tuple[str, ...]  # the resume key: the id, or (id, variant, sample) in a sweep


def prepare(spec: JobSpec, opts: RunOptions) -> Prepared:
    """Everything checked before anything is written or sent: the key and URL, the output (not the
    input, writable), the input (ids, bad rows), the prices a budget needs; the output's schema."""
    api_key = check_api(spec)
    base_url = _base_url(spec, opts)  # refuses "simulator" with none started
    output = checked_output(spec, opts.date)
    try:
        input_seen: os.stat_result | None = os.stat(spec.input.path)
    except OSError:
        input_seen = None  # the reader says what is wrong with it
    spec = with_columns_read(spec)
    reader = open_source(spec.input)
    reader.check()
    _release_memory()
    Ledger.check(spec.limits.budget_usd, job_prices(spec))  # a budget with an unpriced model: refused now
    identity = job_identity(spec)
    schema, fmt = job_schema(spec, reader, identity)
    summary = Summary(job=spec.name, output=str(output), by_variant=spec.is_sweep)
    opts.summary = summary
    return Prepared(spec, api_key, base_url, output, input_seen, reader, identity, schema, fmt, summary,
                    SWEEP_KEY if spec.is_sweep else PLAIN_KEY)


async def run_job(spec: JobSpec, opts: RunOptions | None = None) -> Summary:
    """Run one job to the end (or to a stop) and return its summary; see the module docstring."""
    opts = opts or RunOptions()
    wall_start = opts.clock()
    ready = prepare(spec, opts)
    spec, summary = ready.spec, ready.summary
    with OutputStore.open(ready.output, ready.identity, ready.schema, fresh=opts.fresh,
                          keep_failed=not opts.retry_failed, key=ready.key) as store:
        _release_memory()
        if len(store.index):
            log.info("resuming: %s rows of an earlier run are done and will be skipped", f"{len(store.index):,}")
        money = open_ledger(spec, ready.output)
        rows = ready.reader.num_rows
        per_row = len(spec.variants()) * spec.samples
        progress = Progress(rows * per_row if rows is not None else None, enabled=opts.progress, money=money)
        job = Job(spec, opts, store, summary, progress, ready.api_key, ready.input_seen, money, ready.fmt)
        try:
            await run_lanes(job, ready.reader, ready.api_key)
        except ExceptionGroup as group:
            # one of ours from inside the task group (a Parquet input damaged past its first rows): one line, not a tree
            first = _first_promptmill_error(group)
            if first is None:
                raise
            raise first from None
        finally:
            progress.close()
            if spec.limits.budget_usd is not None:
                summary.budget = money.as_dict()
            summary.rows_failed_kept = store.index.failed_skipped
            summary.wall_s = opts.clock() - wall_start
            with _signals_held(job):
                await _finish(job)
    return summary


@contextlib.contextmanager
def on_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM meanwhile (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handler) for signum in held}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


@contextlib.contextmanager
def _signals_held(job: Job) -> Iterator[None]:
    """SIGINT and SIGTERM while the output is assembled: noted, not obeyed until it is done.

    The assembly is short and already safe to kill, but a kill would leave no summary
    and the exit code of a kill; noted, the job ends as it would after a first signal.
    """
    if not job.opts.handle_signals:
        yield
        return

    def note(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if job.opts.exit_signal is None:
            job.opts.exit_signal = signum
            job.summary.stopped = f"{name} received"
        log.warning("%s: finishing the output first (it is nearly done), then stopping", name)

    with on_signals(note):
        yield


async def _finish(job: Job) -> None:
    """Flush what is left, then :func:`~batch.outputs.finish_output` (in a thread)."""
    failed: DiskError | None = None
    try:
        await job.flush()
    except DiskError as exc:
        failed = exc
    _release_memory()  # what the run's buffers held, before the merge needs its own
    await anyio.to_thread.run_sync(finish_output, job.spec, job.opts.date, job.store, job.summary, failed)


def _target_url(spec: JobSpec, opts: RunOptions, target: Target) -> str:
    """Where a target's requests go: the job's own target (or "simulator") as :func:`_base_url` says."""
    if target.base_url in (spec.api.base_url, "simulator"):
        return _base_url(spec, opts)
    return target.base_url


def _target_key(spec: JobSpec, target: Target, job_key: str | None) -> str | None:
    if (target.base_url, target.api_key_env) == (spec.api.base_url, spec.api.api_key_env):
        return job_key
    api = msgspec.structs.replace(spec.api, base_url=target.base_url, api_key_env=target.api_key_env)
    return check_api(msgspec.structs.replace(spec, api=api))


def timeouts_of(spec: JobSpec) -> Timeouts:
    """The client's timeouts, from ``[api]``."""
    return Timeouts(
        connect=spec.api.connect_timeout_s, read=spec.api.read_timeout_s,
        write=spec.api.write_timeout_s, total=spec.api.request_timeout_s,
    )


async def run_lanes(job: Job, reader: Source, api_key: str | None,
                    limiter_of: Callable[[int], Limiter] | None = None, share: int = 1) -> None:
    """Feed ``reader`` to one lane of workers a target (its own client, limiter and retries), to
    the end or a stop; raise the stop. A Ray worker passes its leases of the cluster's limiters
    (``limiter_of(lane)``) and its ``share`` of each target's own concurrency."""
    spec, opts = job.spec, job.opts
    timeouts = timeouts_of(spec)
    targets = job.fanout.targets
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as outer:
        lanes = []
        for lane, target in enumerate(targets):
            given = limiter_of(lane) if limiter_of is not None else None
            client, limiter, policy = await _lane(job, target, timeouts, api_key, stack, given, share)
            lanes.append(Workers(job, client, limiter, policy, lane))
        outer.start_soon(job.flush_forever)
        if opts.handle_signals:
            outer.start_soon(_watch_signals, job)
        async with anyio.create_task_group() as tg:
            job.workers_scope = tg.cancel_scope
            sends = []
            for workers, target in zip(lanes, targets, strict=True):
                concurrency = lane_concurrency(spec, target, share)
                send, receive = anyio.create_memory_object_stream[Request](max(2 * concurrency, 64))
                sends.append(send)
                async with receive:
                    for _ in range(concurrency):
                        tg.start_soon(workers.work, receive.clone())
            tg.start_soon(job.feed, reader, sends)
        outer.cancel_scope.cancel()
    if job.fatal is None and job.money.reached and opts.exit_signal is None:
        job.fatal = BudgetReached(job.money.stop_text() + "; every finished row is kept: rerun with a higher "
                                  "budget to carry on")
        job.summary.stopped = job.money.stop_text()
    if job.fatal is not None:
        raise job.fatal
    if job.lane_fatal:
        job.fatal = JobStopped(job.lanes_stopped_message() + "; the other variants finished",
                               cause=next(iter(job.lane_fatal.values())))
        job.summary.stopped = str(job.fatal)
        raise job.fatal


def lane_concurrency(spec: JobSpec, target: Target, share: int = 1) -> int:
    """A target's requests in flight (``share`` of them: a Ray worker's): its own concurrency, else the job's."""
    return max(1, (target.concurrency or spec.limits.concurrency) // share)


async def _lane(job: Job, target: Target, timeouts: Timeouts, api_key: str | None,
                stack: contextlib.AsyncExitStack, limiter: Limiter | None = None,
                share: int = 1) -> tuple[Client, Limiter, RetryPolicy]:
    """One target's own client (connection pool), limiter (``limiter``: one given, e.g. a Ray
    worker's lease of the cluster's) and retry policy."""
    spec, opts = job.spec, job.opts
    if limiter is None:
        limiter = Limiter(target.rpm, target.tpm, clock=opts.clock, sleep=opts.sleep)
    policy = RetryPolicy(
        RetrySettings(
            max_attempts=spec.retry.max_attempts, initial_wait_s=spec.retry.initial_wait_s,
            max_wait_s=spec.retry.max_wait_s, row_budget_s=spec.retry.row_budget_s,
            outage_s=spec.retry.outage_s,
        ),
        sleep=opts.sleep,
        clock=opts.clock,
        limiter=limiter,
    )
    base_url = _target_url(spec, opts, target)
    if target.base_url == "simulator":
        log.info("sending to the built-in simulator at %s", base_url)
    client = await stack.enter_async_context(Client(
        base_url, endpoint=target.endpoint, stream=spec.api.stream, api_key=_target_key(spec, target, api_key),
        concurrency=lane_concurrency(spec, target, share), timeouts=timeouts, transport=opts.transport,
        max_body_bytes=int(spec.api.max_response_mb * 2**20), keep_body=spec.output.format == "openai_batch",
    ))
    return client, limiter, policy


async def _watch_signals(job: Job) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if job.opts.exit_signal is None:
                job.opts.exit_signal = signum
                job.stopping = True
                name = signal.Signals(signum).name
                job.summary.stopped = f"{name} received"
                log.warning(
                    "%s: finishing the requests in flight (up to %.0f s), then stopping; send it again to stop at once",
                    name, job.opts.grace_s,
                )
                job.feed_scope.cancel()
                scope = job.workers_scope
                scope.deadline = min(scope.deadline, anyio.current_time() + job.opts.grace_s)
            else:
                log.warning("second signal: stopping now; finished rows are kept")
                job.workers_scope.cancel()
                return
