"""The same job on Ray Data: one driver, a pool of worker actors, one limiter actor.

``promptmill run JOB --engine ray [--ray-address ADDR]`` (or ``[engine] kind = "ray"``).

The driver (this module) checks the job as the local runner does (key, URL,
input, output), opens the output store (its lock, identity and resume index),
then starts a local Ray for the job (loopback only, no dashboard, logs in a
temporary folder removed afterwards) or joins the cluster at ``--ray-address``.
The API key reaches the workers in the runtime env's ``env_vars`` (never in a
log line, an argument or the output). It starts one named
:class:`~batch.engines.ray_limiter.ClusterLimiter` actor for the job, reads the
input with Ray Data (``read_parquet`` / ``read_json``) and hands its blocks to
an actor pool of :class:`~batch.engines.ray_worker.BlockWorker` (``map_batches``),
each running promptmill's own pipeline. Workers write durable parts through the
output store; the driver adds up their summaries and, at the end, assembles
the output as the local engine does (same schema, summary and exit codes).

What it does not do yet is refused in one line before anything is sent (see :func:`check_supported`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.fs as pafs

from batch._startup import restore_skipped_modules
from batch.budget import Ledger, open_ledger
from batch.engines.ray_progress import Interrupted, ProgressView, StopAsked
from batch.errors import BudgetReached, JobStopped, PromptmillError, UsageError
from batch.outputs import finish_output
from batch.runner import Prepared, RunOptions, on_signals, prepare
from batch.spec import JobSpec
from batch.store import OutputStore, next_run_number
from batch.summary import Summary

__all__ = ["check_supported", "run_ray_job"]

log = logging.getLogger(__name__)

_NAMESPACE = "promptmill"
_ROWS_PER_REQUEST_SLOT = 16  # a block holds this many rows for each request a worker has in flight


def check_supported(spec: JobSpec, opts: RunOptions) -> None:
    """Refuse, in one line, what the Ray engine does not run yet (nothing is sent)."""
    unsupported = []
    if opts.transport is not None:
        unsupported.append("a custom HTTP transport")
    if unsupported:
        raise UsageError("the Ray engine does not support " + " or ".join(unsupported)
                         + " yet; run this job with --engine local")


def run_ray_job(spec: JobSpec, opts: RunOptions | None = None, address: str | None = None) -> Summary:
    """Run one job on Ray to the end (or to a stop) and return its summary."""
    opts = opts or RunOptions()
    started = time.perf_counter()
    check_supported(spec, opts)
    restore_skipped_modules()  # the command marked pyarrow's cloud filesystems absent; Ray Data reads through them
    address = address or spec.engine.address
    if address is not None:
        _token_mode()
    try:
        import ray
    except ImportError:
        raise UsageError("the Ray engine needs Ray: pip install 'promptmill[ray]'") from None
    ready = prepare(spec, opts)
    spec, summary, reader = ready.spec, ready.summary, ready.reader
    seen = ready.input_seen or os.stat(spec.input.path)  # there now, as the reader found
    if reader.id_column is None:
        raise UsageError("the Ray engine needs an id column in the input (input.id_column): Ray Data's "
                         "blocks carry no row numbers to name rows by")
    engine = spec.engine
    stop: JobStopped | None = None
    with OutputStore.open(ready.output, ready.identity, ready.schema, fresh=opts.fresh,
                          keep_failed=not opts.retry_failed, key=ready.key) as store:
        if len(store.index):
            log.info("resuming: %s rows of an earlier run are done and will be skipped", f"{len(store.index):,}")
        money = open_ledger(spec, ready.output)
        temp = None if address else tempfile.mkdtemp(prefix="promptmill-ray-")
        env = {spec.api.api_key_env: ready.api_key} if ready.api_key else {}
        logging.getLogger("ray").setLevel(logging.WARNING)  # Ray's own progress lines: not the job's
        try:
            if address is None:
                ray.init(num_cpus=int(engine.workers * engine.cpus_per_worker) + 2, include_dashboard=False,
                         _temp_dir=temp, _node_ip_address="127.0.0.1", namespace=_NAMESPACE,
                         runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
            else:
                _join(address, env)
            try:
                stop = _drive(ready, store, money, seen, opts)
            finally:
                summary.rows_failed_kept = store.index.failed_skipped
                summary.wall_s = time.perf_counter() - started
                finish_output(spec, opts.date, store, summary)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if temp is not None:
                _remove(Path(temp))
    if stop is not None and opts.exit_signal is None:
        raise stop
    return summary


def _remove(temp: Path) -> None:
    """Remove the local Ray's folder; its last processes may still be writing logs as they exit."""
    for _ in range(10):
        shutil.rmtree(temp, ignore_errors=True)
        if not temp.exists():
            return
        time.sleep(0.5)
    log.warning("could not remove Ray's temporary folder %s", temp)


def _join(address: str, env: dict[str, str]) -> None:
    """Join the cluster at ``address``; one line if it cannot be reached.

    A cluster started with ``ray start`` has Ray's token authentication on: see :func:`_token_mode`.
    """
    import ray

    local: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if address.split(":")[0] in ("127.0.0.1", "localhost") else {}
    try:
        ray.init(address=address, namespace=_NAMESPACE, runtime_env={"env_vars": env}, log_to_driver=False,
                 logging_level=logging.WARNING, **local)
    except ConnectionError as exc:
        raise UsageError(f"cannot join the Ray cluster at {address} (--ray-address): {exc}; a cluster with "
                         "token authentication needs its token here (RAY_AUTH_TOKEN, or ~/.ray/auth_token)") from None


def _token_mode() -> None:
    """A driver joining a cluster says it uses Ray's token authentication (``RAY_AUTH_MODE=token``,
    read when Ray is imported) whenever it has the token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``, where ``ray start`` puts it), unless the mode is set already."""
    if "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _block_rows(per_worker: int, workers: int, rows: int | None) -> int:
    """Rows a block holds: enough to keep a worker's requests in flight, few enough that
    every worker gets at least two blocks of a small input."""
    most = per_worker * _ROWS_PER_REQUEST_SLOT
    if rows is None:
        return most
    return max(per_worker, min(most, -(-rows // (2 * workers))))


def _drive(ready: Prepared, store: OutputStore, money: Ledger, seen: os.stat_result,
           opts: RunOptions) -> JobStopped | None:
    """The limiter actor, the dataset, the actor pool; adds each block's summary to the job's
    and returns how the job stopped early, if it did (a fatal answer, the budget, a target).
    ``seen``: the input at start, for the watch of its changes."""
    import ray
    import ray.data

    from batch.engines.ray_limiter import ClusterLimiter
    from batch.engines.ray_money import MoneyArgs
    from batch.engines.ray_worker import BlockWorker, merge_summary
    from batch.fanout import Fanout

    spec, summary, rows = ready.spec, ready.summary, ready.reader.num_rows
    engine = spec.engine
    name = f"limiter-{spec.name}-{uuid.uuid4().hex[:8]}"
    targets = Fanout(spec, fmt=ready.fmt).targets
    money_args = MoneyArgs.of(money)
    limiter: Any = ray.remote(ClusterLimiter).options(name=name, num_cpus=0).remote(
        [(t.rpm, t.tpm) for t in targets], next_run_number(store.path) + 1, money_args)
    per_worker = max(1, spec.limits.concurrency // engine.workers)
    path = str(Path(spec.input.path).resolve())
    fmt = ready.reader.format
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    fs = pafs.LocalFileSystem()  # Ray 2.60's Parquet reader wants one named
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, filesystem=fs)
    else:
        # JSONL as lines, each parsed by the worker as promptmill's own reader does: Ray Data's
        # JSON reader would guess column types ("65" read as 65, which the output cannot hold)
        ds = ray.data.read_text(path, filesystem=fs)
    # blocks of a worker's size, streamed: every worker gets some, however few files the input is
    block_rows = _block_rows(per_worker, engine.workers, rows)
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    ds = ds.map_batches(
        BlockWorker, batch_size=block_rows, batch_format="pyarrow",
        # a block at a time: a block queued behind a busy worker would wait while another is idle
        compute=ray.data.ActorPoolStrategy(size=engine.workers, max_tasks_in_flight_per_actor=1),
        num_cpus=engine.cpus_per_worker,
        fn_constructor_kwargs={
            "spec": spec, "output": str(store.path), "schema": store.schema, "fmt": ready.fmt,
            "base_url": ready.base_url, "limiter": name, "namespace": _NAMESPACE, "workers": engine.workers,
            "money": money_args, "keep_failed": not opts.retry_failed, "key": ready.key,
        },
    )
    per_row = len(spec.variants()) * spec.samples
    stop = StopAsked(opts.grace_s)
    view = ProgressView(limiter, rows * per_row if rows is not None else None, opts.progress, money.limit, stop,
                        (str(spec.input.path), seen.st_size, seen.st_mtime_ns))
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    ray_threads = set(threading.enumerate())
    try:
        with on_signals(stop.handler):
            view.start()
            for out in batches:
                batch = cast(pa.Table, out)
                for blob in batch.column("summary").to_pylist():
                    merge_summary(summary, pickle.loads(blob))
    except Interrupted as signalled:
        log.warning("%s: stopping at once; the workers' rows on disk are kept", signalled.name)
    except ray.exceptions.RayError as exc:
        found = _ours(exc)
        if found is None:
            raise
        raise found from None
    finally:
        view.stop()
        _stop_dataset(batches, ray_threads)
        if stop.signum is not None:
            summary.stopped = f"{signal.Signals(stop.signum).name} received"
            opts.exit_signal = stop.signum
    stats = ray.get(limiter.stats.remote())
    log.info("cluster limiter: %d requests admitted, %d answered 429", stats["requests"], stats["rate_limited"])
    if stats["workers_lost"]:
        log.warning("%d worker(s) were lost mid-block; Ray handed their blocks out again", stats["workers_lost"])
    return _stopped(spec, summary, limiter)


def _stopped(spec: JobSpec, summary: Summary, limiter: Any) -> JobStopped | None:
    """How the job stopped early, from the limiter actor, as the local engine says it."""
    import ray

    fatal, code, lanes = ray.get(limiter.stopped.remote())
    budget, reached, stop_text = ray.get(limiter.money.remote())
    if spec.limits.budget_usd is not None:
        summary.budget = budget
    stop: JobStopped | None = None
    if fatal is not None:
        stop = JobStopped(fatal)
        stop.exit_code = code
        summary.stopped = fatal
    elif reached:
        summary.stopped = stop_text
        stop = BudgetReached(stop_text + "; every finished row is kept: rerun with a higher budget to carry on")
    elif lanes:
        stop = JobStopped("; ".join(lanes[lane] for lane in sorted(lanes)) + "; the other variants finished")
        summary.stopped = str(stop)
    if stop is not None:
        log.error("%s", stop)
    return stop


def _stop_dataset(batches: Any, before: set[threading.Thread], timeout_s: float = 15.0) -> None:
    """Stop the dataset's execution and wait for Ray Data's threads to end, before Ray is shut down.

    A stop mid-dataset (a fatal answer) leaves Ray Data's executor running in its own
    threads; one of them touching Ray after ``ray.shutdown()`` makes Ray end the whole
    process with exit code 1, whatever the job's own exit code was.
    """
    close = getattr(batches, "close", None)
    if close is not None:
        close()  # a generator: its cleanup shuts the streaming executor down
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        # the executor's scheduling loop; Ray Data's prefetcher thread lives on, idle, by design
        if thread not in before and thread.name.startswith("StreamingExecutor"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _ours(exc: BaseException) -> PromptmillError | None:
    """One of promptmill's errors inside a Ray task error (a worker that could not start), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(cause, PromptmillError):
            return cause
        if isinstance(seen, PromptmillError):
            return seen
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return None
