"""Wires the stages into one job: reader → builder → limiter → client (with retries) → writer.

One anyio task group holds a feeder (reads the input in a worker thread and
builds requests), ``concurrency`` workers and a flusher. Between the feeder and
the workers is a bounded memory object stream, so the reader never runs more
than a few batches ahead and memory stays flat however large the input is.
Workers hand each finished row to the :class:`~batch.writer.PartWriter`
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
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx
import msgspec
import orjson
import pyarrow as pa
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batch import __version__
from batch import writer as out
from batch.client import Client, Reply, Timeouts
from batch.errors import (
    APIConnectionError,
    DiskError,
    InputChanged,
    InputError,
    JobStopped,
    OutputError,
    PromptmillError,
    RequestError,
    UsageError,
)
from batch.limiter import Limiter, _has_rate_headers, answer_tokens
from batch.pricing import Price, PriceTable
from batch.progress import Progress
from batch.prompts import RequestBuilder
from batch.reader import InputReader, row_error
from batch.records import Request, Result, Row
from batch.retry import RetryPolicy, RetrySettings, classify, retry_after
from batch.spec import JobSpec, is_loopback
from batch.summary import Summary

__all__ = ["RunOptions", "check_api", "job_identity", "run_job"]

log = logging.getLogger(__name__)

# the feeder lets the workers run at least this often while it builds requests
_YIELD_EVERY = 64


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


def job_identity(spec: JobSpec) -> dict[str, Any]:
    """What makes two runs the same job for one output: its name and its input.

    The model, template and request parameters are not part of it: changing
    them is still the same job, and the rows whose requests changed are redone.
    """
    return {
        "job": spec.name,
        "input": str(Path(spec.input.path).resolve()),
        "id_column": spec.input.id_name,
    }


def _metadata(spec: JobSpec, identity: dict[str, Any]) -> dict[bytes, bytes]:
    # the settings of the job, for audit; the key variable's name is in them, never its value
    settings = spec.settings()
    if isinstance(settings.get("simulator"), dict) and settings["simulator"].get("api_key") is not None:
        # the key a built-in simulator expects is the job's real key too, as often as not
        settings["simulator"]["api_key"] = "***"
    doc = {"identity": identity, "settings": settings, "promptmill": __version__}
    return {out.METADATA_KEY: orjson.dumps(doc, default=str)}


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


class _Job:
    """The state of one running job, shared by its tasks."""

    def __init__(self, spec: JobSpec, opts: RunOptions, writer: out.PartWriter, summary: Summary,
                 index: out.ResumeIndex, progress: Progress, secret: str | None = None,
                 input_seen: os.stat_result | None = None) -> None:
        self.spec = spec
        # the API key: redacted from every text a server sent before it is stored or counted
        self.secret = secret if secret and len(secret) >= 4 else None
        self.opts = opts
        self.writer = writer
        self.summary = summary
        self.index = index
        self.progress = progress
        self.model = spec.request.model
        self.endpoint = spec.api.endpoint
        self.prices = PriceTable(
            {m: Price(p.input, p.output, p.cached_input) for m, p in spec.pricing.items()}
        )
        self.flush_rows = opts.flush_rows or spec.flush_rows()
        self.flush_s = opts.flush_s or spec.output.flush_s
        self.stopping = False
        self.told: set[str] = set()  # failure codes already logged once
        self.outage_s = spec.retry.outage_s
        self.max_wait_s = spec.retry.max_wait_s
        self.wait_end = -float("inf")  # when the longest wait the server asked for ends (opts.clock)
        self.wait_told = 0.0
        self.wait_step = max(spec.retry.max_wait_s, 1.0)
        self.down_after = max(10, 2 * spec.limits.concurrency)
        self.down_rows = 0  # rows failed in a row, in ways that are retried (an outage when it lasts)
        self.last_ok = opts.clock()
        self.flush_due = anyio.Event()
        # Requests sent but not yet durable: in flight, or finished and not yet in a part on
        # disk. A kill loses at most these, so they are held to concurrency + flush_rows.
        self.in_flight = 0
        self.unflushed = 0
        self.max_at_risk = spec.limits.concurrency + self.flush_rows
        self.flushed = anyio.Event()
        self.fatal: PromptmillError | None = None
        self.sent = 0  # rows handed to the client (sent at least once)
        seen = os.stat(spec.input.path) if input_seen is None else input_seen
        self.input_seen: tuple[int, int] = (seen.st_size, seen.st_mtime_ns)
        self.feed_scope = anyio.CancelScope()
        self.workers_scope = anyio.CancelScope()

    # -- results -------------------------------------------------------------

    def record(self, result: Result) -> None:
        if self.secret is not None:
            result = _redacted(result, self.secret)
        self.writer.add(result)
        self.summary.add(result)
        self.progress.update(result.status == "ok")
        self.unflushed += 1
        # half the flush size: the next half can gather while this one is written
        if len(self.writer) * 2 >= self.flush_rows:
            self.flush_due.set()

    def failed_row(self, row: Row, message: str, code: str) -> None:
        self.record(Result(
            index=row.index, id=row.id, passthrough=row.values, fingerprint="", model=self.model,
            endpoint=self.endpoint, status="failed", error_code=code, error=message,
        ))

    def check_wait(self, seconds: float, exc: RequestError | None, what: str) -> None:
        """A wait the server asked for: beyond ``retry.max_wait_s`` it is announced in one line
        (then logged as it goes, see :meth:`tell_waiting`); beyond ``retry.outage_s`` the job stops."""
        if seconds <= self.max_wait_s:
            return
        retry = self.spec.retry
        when = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S UTC")
        if seconds > self.outage_s:
            self.stop_now(exc, (
                f"the server asked to wait {_span(seconds)} ({what}, until {when}), past retry.outage_s "
                f"({retry.outage_s:g} s): stopping; rows already finished are kept, rerun the same command "
                f"after {when}"
            ))
            return
        end = self.opts.clock() + seconds
        if end <= self.wait_end + 1.0:
            return  # the same wait, already announced
        self.wait_end = end
        self.wait_told = self.opts.clock()
        log.warning(
            "the server asked to wait %s (%s, until %s), longer than retry.max_wait_s (%g s): waiting for it, "
            "with a line every %g s; a wait past retry.outage_s (%g s) would stop the job",
            _span(seconds), what, when, retry.max_wait_s, self.wait_step, retry.outage_s,
        )

    def tell_waiting(self) -> None:
        """During a long wait the server asked for, one line every ``wait_step`` seconds."""
        now = self.opts.clock()
        if now >= self.wait_end or now - self.wait_told < self.wait_step:
            return
        self.wait_told = now
        log.warning("still waiting for the server: %s left", _span(self.wait_end - now))

    def stop_now(self, exc: RequestError | None, message: str | None = None) -> None:
        """A fatal answer: every further request would fail the same way, so stop all of them."""
        if self.fatal is None:
            assert exc is not None or message is not None
            self.fatal = JobStopped(message or _fatal_message(exc), cause=exc)  # type: ignore[arg-type]
            self.summary.stopped = str(self.fatal)
        self.stopping = True
        self.feed_scope.cancel()
        self.workers_scope.cancel()

    # -- stages --------------------------------------------------------------

    async def feed(self, reader: InputReader, builder: RequestBuilder,
                   send: MemoryObjectSendStream[Request]) -> None:
        """Read, build and hand out requests, skipping rows an earlier run finished."""
        async with send:
            with self.feed_scope:
                await self._feed(reader.batches(), builder, send)

    async def _feed(self, batches: Iterator[list[Row]], builder: RequestBuilder,
                    send: MemoryObjectSendStream[Request]) -> None:
        index = self.index
        handed = 0
        while not self.stopping:
            batch = await anyio.to_thread.run_sync(self._next_batch, batches)
            if batch is None:
                return
            skipped = 0
            for row in batch:
                error = row_error(row)
                if error is not None:
                    self.failed_row(row, error, "bad_input")
                    continue
                request = builder.build_unless_done(row, index) if index else builder.build(row)
                if request is None:
                    skipped += 1
                    continue
                # Usually there is room: hand it over without a trip through the event
                # loop (``send`` always yields once), but let the workers in every so often.
                try:
                    send.send_nowait(request)
                except anyio.WouldBlock:
                    await send.send(request)
                else:
                    handed += 1
                    if handed % _YIELD_EVERY == 0:
                        await anyio.lowlevel.checkpoint()
                if self.stopping:
                    return
            if skipped:
                self.summary.rows_skipped += skipped
                self.progress.skip(skipped)

    def _next_batch(self, batches: Iterator[list[Row]]) -> list[Row] | None:
        """The next batch of rows, or None at the end; stops the job if the input changed meanwhile."""
        try:
            batch = next(batches, None)
        except PromptmillError:
            if self._input_changed() is None:
                raise
            batch = None
        change = self._input_changed()
        if change is None:
            return batch
        path = self.spec.input.path
        if self.sent == 0:
            self.fatal = InputError(f"the input changed while the job read it ({change}); nothing was sent: "
                                    "rerun once it is complete", path=path)
        else:
            self.fatal = InputChanged(
                f"{path}: the input changed while the job ran ({change}): stopping; {self.sent:,} requests "
                "were sent and every finished row is kept; rerun the same command once the input is final"
            )
        self.summary.stopped = str(self.fatal)
        self.stopping = True  # workers finish what is in flight and take no more
        return None

    def _input_changed(self) -> str | None:
        """How the input's size or modification time differs from what the job saw at start, if it does."""
        try:
            now = os.stat(self.spec.input.path)
        except OSError as exc:
            return f"it is gone: {exc.strerror}"
        size, mtime = self.input_seen
        if now.st_size != size:
            return f"{size:,} bytes at start, now {now.st_size:,}"
        if now.st_mtime_ns != mtime:
            return "modified since the job started"
        return None

    async def work(self, receive: MemoryObjectReceiveStream[Request], client: Client,
                   limiter: Limiter, policy: RetryPolicy) -> None:
        clock = self.opts.clock
        async with receive:
            while True:
                # ``receive`` always yields to the loop once: take a waiting request without that
                try:
                    request = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        request = await receive.receive()
                    except anyio.EndOfStream:
                        break
                except anyio.EndOfStream:
                    break
                while self.in_flight + self.unflushed >= self.max_at_risk and not self.stopping:
                    await self.flushed.wait()  # rare: the disk is slower than the answers
                if self.stopping:
                    break
                started = clock()
                self.sent += 1
                self.in_flight += 1
                try:
                    reply, attempts = await policy.call(
                        partial(self._attempt, request, client, limiter), row_id=request.id
                    )
                except RequestError as exc:
                    exc.row_id = request.id
                    outcome = classify(exc)
                    if outcome == "fatal":
                        self.stop_now(exc)
                        return
                    self.record(self._failure(request, exc, clock() - started))
                    self._tell_first(exc)
                    if self._outage(exc, outcome == "retry" and exc.http_status != 429, clock()):
                        return
                    continue
                finally:
                    self.in_flight -= 1
                self.down_rows = 0
                self.last_ok = clock()
                self.record(self._success(request, reply, attempts))

    def _outage(self, exc: RequestError, down: bool, now: float) -> bool:
        """Count a failed row toward an outage (``down``: it failed in a way that is retried,
        not a 429); stop the job once it is one (see the module docstring)."""
        if not down:
            self.down_rows = 0  # the server answered: it is up
            return False
        self.down_rows += 1
        if self.down_rows < self.down_after or now - self.last_ok < self.outage_s:
            return False
        self.stop_now(exc, (
            f"no request has succeeded for {now - self.last_ok:.0f} s and the last {self.down_rows:,} rows "
            f"failed ({exc.message}): stopping; rows already finished are kept, rerun the same command "
            "once the server is back (retry.outage_s sets how long to wait)"
        ))
        return True

    async def _attempt(self, request: Request, client: Client, limiter: Limiter) -> Reply:
        """One attempt at one row: wait for the rate budget, send, tell the limiter how it went."""
        body = request.body
        # what a server charges at admission: the prompt plus every token the answer may take
        reserve = request.est_prompt_tokens + answer_tokens(body)
        reservation = await limiter.acquire(reserve)
        try:
            reply = await client.complete(body)
        except APIConnectionError:
            limiter.release(reservation)
            raise
        except RequestError as exc:
            asked = retry_after(exc.headers) if exc.headers else None
            if exc.http_status == 429:
                pause = limiter.on_rate_limited(exc.headers, reservation)
                if asked is not None or _has_rate_headers(exc.headers):
                    self.check_wait(pause, exc, "Retry-After" if asked is not None else "x-ratelimit-reset")
            else:
                limiter.settle(reservation, None)
                if asked is not None and classify(exc) == "retry":
                    self.check_wait(asked, exc, "Retry-After")
            raise
        limiter.on_response(reply.headers, reservation)
        if not limiter.free and (blocked := limiter.blocked_for()) > self.max_wait_s:
            self.check_wait(blocked, None, "x-ratelimit-reset")
        usage = reply.completion.usage
        # settle against the real prompt size; the answer's share stays reserved as the server counts it
        limiter.settle(reservation, reserve - request.est_prompt_tokens + usage.prompt_tokens if usage else None)
        return reply

    def _success(self, request: Request, reply: Reply, attempts: int) -> Result:
        c = reply.completion
        u = c.usage
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=self.model, endpoint=self.endpoint, status="ok",
            text=c.text, refusal=c.refusal, finish_reason=c.finish_reason,
            prompt_tokens=u.prompt_tokens if u else None,
            completion_tokens=u.completion_tokens if u else None,
            total_tokens=u.total_tokens if u else None,
            cached_tokens=u.cached_tokens if u else None,
            reasoning_tokens=u.reasoning_tokens if u else None,
            cost_usd=self.prices.cost(self.model, u),
            latency_s=reply.latency_s, ttft_s=c.ttft_s, attempts=attempts, http_status=reply.http_status,
            response_id=c.response_id, created=c.created, system_fingerprint=c.system_fingerprint,
        )

    def _tell_first(self, exc: RequestError) -> None:
        """Log the first failed row of each kind, so a long run shows what goes wrong as it goes."""
        code = exc.code or type(exc).__name__
        if code in self.told:
            return
        self.told.add(code)
        hint = ""
        if exc.http_status == 404:
            hint = "; check api.base_url (with its version prefix, like .../v1) and request.model"
        log.warning("row %s failed: %s%s (rows failing the same way are counted in the summary)",
                    exc.row_id, exc.message, hint)

    def _failure(self, request: Request, exc: RequestError, elapsed: float) -> Result:
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=self.model, endpoint=self.endpoint, status="failed",
            latency_s=elapsed, attempts=exc.attempts or 1, http_status=exc.http_status,
            error_code=exc.code or type(exc).__name__, error=exc.message,
        )

    async def flush_forever(self) -> None:
        while True:
            with anyio.move_on_after(self.flush_s):
                await self.flush_due.wait()
            self.flush_due = anyio.Event()
            await self.flush()
            self.tell_waiting()

    async def flush(self) -> None:
        if self.writer.unwritten:  # kept by a disk error: the first to try again
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.writer.write_unwritten)
        table = self.writer.take()
        if table is not None:
            # shielded: a cancel must not lose a part half-way through its write
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.writer.write, table)
            self.unflushed -= table.num_rows
            self.flushed.set()
            self.flushed = anyio.Event()


_SERVER_TEXT = ("text", "finish_reason", "error_code", "error", "response_id", "system_fingerprint")


def _redacted(result: Result, secret: str) -> Result:
    """``result`` with the exact key replaced by ``[redacted]`` in every text a server sent
    (a server echoing the prompt's headers or the key back in its answer)."""
    changes = {
        name: value.replace(secret, "[redacted]")
        for name in _SERVER_TEXT
        if isinstance(value := getattr(result, name), str) and secret in value
    }
    return msgspec.structs.replace(result, **changes) if changes else result


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


def _span(seconds: float) -> str:
    """A wait as a person reads it: ``86,400 s (24.0 h)``."""
    if seconds >= 3600:
        return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"
    if seconds >= 120:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s"


def _fatal_message(exc: RequestError) -> str:
    what = {401: "the API key was refused (401)", 402: "payment required (402): the balance is spent",
            403: "access forbidden (403)"}.get(exc.http_status or 0, f"the quota is spent ({exc.http_status}, {exc.code})")
    return f"{what}: {exc.message}; rows already finished are kept, rerun the same command once it is fixed"


async def run_job(spec: JobSpec, opts: RunOptions | None = None) -> Summary:
    """Run one job to the end (or to a stop) and return its summary; see the module docstring."""
    opts = opts or RunOptions()
    wall_start = opts.clock()
    api_key = check_api(spec)
    _base_url(spec, opts)  # refuse "simulator" with none started before anything is written
    output = spec.output_path()
    out.check_not_input(output, Path(spec.input.path))
    out.check_output_writable(output)
    out.check_output_ours(output)
    try:
        input_seen = os.stat(spec.input.path)  # before it is read: a change from now on stops the job
    except OSError:
        input_seen = None  # the reader says what is wrong with it
    reader = InputReader(spec.input)
    reader.check()
    _release_memory()
    builder = RequestBuilder(spec)
    identity = job_identity(spec)
    schema = out.output_schema(reader.passthrough_schema, _metadata(spec, identity))
    summary = Summary(job=spec.name, output=str(output))
    opts.summary = summary

    lock = out.OutputLock(output)
    lock.acquire()
    try:
        if opts.fresh:
            out.discard_progress(output)
        else:
            previous = out.read_job_identity(output)
            if previous is not None and previous != identity:
                raise OutputError(
                    f"this output was written by another job ({previous.get('job')!r} reading "
                    f"{previous.get('input')}); choose another output, or pass --fresh to replace it",
                    path=output,
                )
        out.write_job_identity(output, identity)
        index = out.load_index(output, include_failed=not opts.retry_failed)
        _release_memory()
        if len(index):
            log.info("resuming: %s rows of an earlier run are done and will be skipped", f"{len(index):,}")
        writer = out.PartWriter(output, schema, out.next_run_number(output))
        progress = Progress(getattr(reader, "num_rows", None), enabled=opts.progress)
        job = _Job(spec, opts, writer, summary, index, progress, api_key, input_seen)
        try:
            await _run(job, reader, builder, api_key)
        except ExceptionGroup as group:
            # one of ours from inside the task group (a Parquet input damaged past its first rows): one line, not a tree
            first = _first_promptmill_error(group)
            if first is None:
                raise
            raise first from None
        finally:
            progress.close()
            summary.rows_failed_kept = index.failed_skipped
            summary.wall_s = opts.clock() - wall_start
            with _signals_held(job):
                await _finish(job, output, schema)
        # while the lock is held: a run starting now must not see the folder vanish under it
        out.remove_parts_dir(output)
    finally:
        lock.release()
    return summary


@contextlib.contextmanager
def _signals_held(job: _Job) -> Iterator[None]:
    """SIGINT and SIGTERM while the output is assembled: noted, not obeyed until it is done.

    The assembly is short and already safe to kill, but a kill would leave no summary
    and the exit code of a kill; noted, the job ends as it would after a first signal.
    """
    if not job.opts.handle_signals or threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if job.opts.exit_signal is None:
            job.opts.exit_signal = signum
            job.summary.stopped = f"{name} received"
        log.warning("%s: finishing the output first (it is nearly done), then stopping", name)

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, note) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _finish(job: _Job, output: Path, schema: pa.Schema) -> None:
    """Flush what is left, assemble the output, write the summary; a disk error in any of
    them stops the rest of what needs the disk (never the parts on it) and is raised last."""
    summary = job.summary
    failed: DiskError | None = None
    try:
        await job.flush()
        _release_memory()  # what the run's buffers held, before the merge needs its own
        await anyio.to_thread.run_sync(out.assemble, output, schema)
    except DiskError as exc:
        failed = exc
        summary.stopped = str(exc)
    path = output.with_name(output.name + ".summary.json")
    try:
        summary.write_json(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.with_name(f".{path.name}.tmp").unlink()
        failed = failed or DiskError(exc, path=path, what="the summary")
    if failed is not None:
        if not summary.stopped:
            summary.stopped = str(failed)
        log.debug("rows not on disk: %d", len(job.writer) + sum(t.num_rows for t in job.writer.unwritten))
        raise failed


async def _run(job: _Job, reader: InputReader, builder: RequestBuilder, api_key: str | None) -> None:
    spec, opts = job.spec, job.opts
    concurrency = spec.limits.concurrency
    timeouts = Timeouts(
        connect=spec.api.connect_timeout_s, read=spec.api.read_timeout_s,
        write=spec.api.write_timeout_s, total=spec.api.request_timeout_s,
    )
    limiter = Limiter(spec.limits.rpm, spec.limits.tpm, clock=opts.clock, sleep=opts.sleep)
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
    base_url = _base_url(spec, opts)
    if spec.api.is_simulator:
        log.info("sending to the built-in simulator at %s", base_url)
    async with Client(
        base_url, endpoint=spec.api.endpoint, stream=spec.api.stream, api_key=api_key,
        concurrency=concurrency, timeouts=timeouts, transport=opts.transport,
        max_body_bytes=int(spec.api.max_response_mb * 2**20),
    ) as client, anyio.create_task_group() as outer:
        outer.start_soon(job.flush_forever)
        if opts.handle_signals:
            outer.start_soon(_watch_signals, job)
        async with anyio.create_task_group() as tg:
            job.workers_scope = tg.cancel_scope
            send, receive = anyio.create_memory_object_stream[Request](max(2 * concurrency, 64))
            tg.start_soon(job.feed, reader, builder, send)
            async with receive:
                for _ in range(concurrency):
                    tg.start_soon(job.work, receive.clone(), client, limiter, policy)
        outer.cancel_scope.cancel()
    if job.fatal is not None:
        raise job.fatal


async def _watch_signals(job: _Job) -> None:
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



