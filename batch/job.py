"""One running job: its shared state, the feeder and the flusher.

The feeder reads the input (in a worker thread), builds requests and hands them
to the workers (:mod:`batch.worker`) through a bounded stream, skipping rows an
earlier run finished. Workers :meth:`~Job.record` each finished row into the
output store's buffers; the flusher alone writes parts to disk (in a thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from batch.budget import Ledger
from batch.embed_group import EmbedGroups
from batch.errors import InputChanged, InputError, JobStopped, PromptmillError, RequestError
from batch.fanout import Fanout
from batch.progress import Progress
from batch.records import Request, Result, Row
from batch.scores import Scorer
from batch.sources import Source
from batch.spec import JobSpec
from batch.store import OutputStore
from batch.structured import OutputFormat
from batch.summary import Summary

if TYPE_CHECKING:
    from batch.runner import RunOptions

__all__ = ["Job", "input_change", "span"]

log = logging.getLogger(__name__)

# the feeder lets the workers run at least this often while it builds requests
_YIELD_EVERY = 64


class Job:
    """The state of one running job, shared by its tasks: the feeder, the workers
    (:class:`~batch.worker.Workers`) and the flusher."""

    def __init__(self, spec: JobSpec, opts: RunOptions, store: OutputStore, summary: Summary,
                 progress: Progress, secret: str | None = None, input_seen: os.stat_result | None = None,
                 money: Ledger | None = None, fmt: OutputFormat | None = None) -> None:
        self.spec = spec
        self.money = money or Ledger(None, {spec.request.model: None})  # spent, reserved and the budget
        # the API key: redacted from every text a server sent before it is stored or counted
        self.secret = secret if secret and len(secret) >= 4 else None
        self.opts = opts
        self.store = store
        self.summary = summary
        self.index = store.index
        self.progress = progress
        self.model = spec.request.model
        self.endpoint = spec.api.endpoint
        self.fanout = Fanout(spec, fmt=fmt)
        self.scorer = Scorer(spec.scores) if spec.scores else None
        # lanes (targets) stopped by a fatal answer, while the others go on
        self.lane_fatal: dict[int, RequestError] = {}
        self.flush_rows = opts.flush_rows or spec.flush_rows()
        self.flush_s = opts.flush_s or spec.output.flush_s
        self.stopping = False
        self.outage_s = spec.retry.outage_s
        self.max_wait_s = spec.retry.max_wait_s
        self.wait_end = -float("inf")  # when the longest wait the server asked for ends (opts.clock)
        self.wait_told = 0.0
        self.wait_step = max(spec.retry.max_wait_s, 1.0)
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
        changes: dict[str, object] = {"finished_at": datetime.now(UTC)}
        if result.variant is not None:
            changes["params"] = self.fanout.params_json.get(result.variant)
        if self.scorer is not None:
            # a score may read the parsed answer (``field = "parsed.answer"``) as well as the input's columns
            row = result.passthrough if result.columns is None else {**result.passthrough, **result.columns}
            changes["passthrough"] = {**result.passthrough, **self.scorer.score(result.text, row)}
        result = msgspec.structs.replace(result, **changes)
        self.store.add(result)
        self.summary.add(result)
        self.progress.update(result.status == "ok", result.total_tokens or 0)
        self.unflushed += 1
        # half the flush size: the next half can gather while this one is written
        if len(self.store) * 2 >= self.flush_rows:
            self.flush_due.set()

    def failed_row(self, row: Row, message: str, code: str) -> None:
        """A row that cannot be sent: one failed result for each of its variants and samples."""
        fanout = self.fanout
        for sample in range(fanout.samples):
            for variant in fanout.variants:
                self.record(Result(
                    index=row.index, id=row.id, passthrough=row.values, fingerprint="", model=variant.model,
                    endpoint=variant.target.endpoint, status="failed", error_code=code, error=message,
                    variant=variant.name, sample=sample,
                ))

    def stop_lane(self, lane: int, exc: RequestError) -> None:
        """A fatal answer from one target: its variants stop; the job stops when no target is left."""
        if len(self.fanout.targets) == 1:
            self.stop_now(exc)
            return
        if lane in self.lane_fatal:
            return
        self.lane_fatal[lane] = exc
        target = self.fanout.targets[lane]
        names = [v.name for v in self.fanout.variants if v.target == target]
        log.error("target %s: %s; its variants (%s) stop, the others go on", target.name, _fatal_message(exc),
                  ", ".join(names))
        if len(self.lane_fatal) == len(self.fanout.targets):
            self.stop_now(exc, self.lanes_stopped_message())

    def lanes_stopped_message(self) -> str:
        return "; ".join(self.lane_stopped_text(lane) for lane in self.lane_fatal)

    def lane_stopped_text(self, lane: int) -> str:
        """``target NAME (its variants): what it answered``, for a target stopped by a fatal answer."""
        target = self.fanout.targets[lane]
        names = ", ".join(v.name for v in self.fanout.variants if v.target == target)
        return f"target {target.name} ({names}): {_fatal_message(self.lane_fatal[lane])}"

    def check_wait(self, seconds: float, exc: RequestError | None, what: str) -> None:
        """A wait the server asked for: beyond ``retry.max_wait_s`` it is announced in one line
        (then logged as it goes, see :meth:`tell_waiting`); beyond ``retry.outage_s`` the job stops."""
        if seconds <= self.max_wait_s:
            return
        retry = self.spec.retry
        when = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S UTC")
        if seconds > self.outage_s:
            self.stop_now(exc, (
                f"the server asked to wait {span(seconds)} ({what}, until {when}), past retry.outage_s "
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
            span(seconds), what, when, retry.max_wait_s, self.wait_step, retry.outage_s,
        )

    def tell_waiting(self) -> None:
        """During a long wait the server asked for, one line every ``wait_step`` seconds."""
        now = self.opts.clock()
        if now >= self.wait_end or now - self.wait_told < self.wait_step:
            return
        self.wait_told = now
        log.warning("still waiting for the server: %s left", span(self.wait_end - now))

    def stop_feeding(self) -> None:
        """The budget is reached (see :mod:`batch.budget`), or a job on Ray is asked to stop: send
        nothing more; requests in flight finish."""
        self.stopping = True
        self.feed_scope.cancel()

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

    async def feed(self, reader: Source, sends: list[MemoryObjectSendStream[Request]]) -> None:
        """Read, build and hand out requests (to each target's lane), skipping those an earlier run finished."""
        with contextlib.ExitStack() as stack:
            for send in sends:
                stack.enter_context(send)
            with self.feed_scope:
                await self._feed(reader.batches(), sends)

    async def _feed(self, batches: Iterator[list[Row]], sends: list[MemoryObjectSendStream[Request]]) -> None:
        fanout = self.fanout
        index = self.index
        handed = 0
        embeds = {name for name, endpoint in fanout.endpoint_of.items() if endpoint == "embeddings"}
        groups = (EmbedGroups(self.spec.input.embed_batch, self.spec.input.embed_max_tokens)
                  if embeds and self.spec.input.embed_batch > 1
                  # an openai_batch output line holds its own request's body: one row a request
                  and self.spec.output.format != "openai_batch" else None)
        while not self.stopping:
            batch = await anyio.to_thread.run_sync(self._next_batch, batches)
            if batch is None:
                for last in groups.flush() if groups is not None else ():
                    if not self.stopping and last.lane not in self.lane_fatal:
                        await sends[last.lane].send(last)
                return
            skipped = 0
            for row in batch:
                if row.error is not None:
                    self.failed_row(row, row.error, "bad_input")
                    continue
                requests, done = fanout.requests(row, index)
                skipped += done
                for request in requests:
                    if request.lane in self.lane_fatal:
                        continue
                    if groups is not None and not request.endpoint and request.variant in embeds:
                        grouped = groups.add(request)
                        if grouped is None:
                            continue
                        request = grouped
                    send = sends[request.lane]
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
        return input_change(self.spec.input.path, self.input_seen)

    async def flush_forever(self) -> None:
        while True:
            with anyio.move_on_after(self.flush_s):
                await self.flush_due.wait()
            self.flush_due = anyio.Event()
            await self.flush()
            self.tell_waiting()

    async def flush(self) -> None:
        if self.store.unwritten:  # kept by a disk error: the first to try again
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.store.write_unwritten)
        table = self.store.take()
        if table is not None:
            # shielded: a cancel must not lose a part half-way through its write
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.store.write, table)
            self.unflushed -= table.num_rows
            self.flushed.set()
            self.flushed = anyio.Event()


_SERVER_TEXT = ("text", "finish_reason", "error_code", "error", "response_id", "system_fingerprint",
                "response_body", "request_id")


def _redacted(result: Result, secret: str) -> Result:
    """``result`` with the exact key replaced by ``[redacted]`` in every text a server sent
    (a server echoing the prompt's headers or the key back in its answer)."""
    changes = {
        name: value.replace(secret, "[redacted]")
        for name in _SERVER_TEXT
        if isinstance(value := getattr(result, name), str) and secret in value
    }
    return msgspec.structs.replace(result, **changes) if changes else result


def span(seconds: float) -> str:
    """A wait as a person reads it: ``86,400 s (24.0 h)``."""
    if seconds >= 3600:
        return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"
    if seconds >= 120:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s"


def input_change(path: str | os.PathLike[str], seen: tuple[int, int]) -> str | None:
    """How the input's size or modification time differs from ``seen`` (at start), if it does."""
    try:
        now = os.stat(path)
    except OSError as exc:
        return f"it is gone: {exc.strerror}"
    size, mtime = seen
    if now.st_size != size:
        return f"{size:,} bytes at start, now {now.st_size:,}"
    if now.st_mtime_ns != mtime:
        return "modified since the job started"
    return None


def _fatal_message(exc: RequestError) -> str:
    what = {401: "the API key was refused (401)", 402: "payment required (402): the balance is spent",
            403: "access forbidden (403)"}.get(exc.http_status or 0, f"the quota is spent ({exc.http_status}, {exc.code})")
    return f"{what}: {exc.message}; rows already finished are kept, rerun the same command once it is fixed"
