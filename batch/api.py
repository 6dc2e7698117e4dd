"""The Python API: run a job, or complete a table of rows, from a notebook, a script or an Airflow ``@task``.

    summary = batch.run("jobs/nightly.toml", date=date(2024, 6, 30), concurrency=64)
    table = batch.complete(rows, model="gpt-4o-mini", base_url="https://api.openai.com/v1",
                           template="Summarise: {text}", api_key_env="OPENAI_API_KEY")

Both go through the same pipeline as the command (limits, retries, resume,
cost). ``arun`` and ``acomplete`` are the same for a caller's event loop.
None of them installs signal handlers. ``run`` and ``complete`` called where
an event loop is already running in the thread (a Jupyter cell) run the job
in a worker thread and wait for it, so they work there too.

A fatal answer or an outage raises :class:`~batch.errors.JobStopped` with the
stopped run's summary in ``.summary``; bad input raises a
:class:`~batch.errors.UsageError`; finished rows are kept either way.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from batch.errors import JobStopped, UsageError
from batch.options import OPTION_KEYS
from batch.runner import RunOptions, run_job
from batch.spec import JobSpec
from batch.spec_load import load_job
from batch.summary import Summary

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["acomplete", "arun", "complete", "run"]

T = TypeVar("T")



def _overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Option names (``concurrency``) and dotted job keys (``"request.temperature"``) as job keys."""
    keys = {}
    for name, value in overrides.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)  # the job file's types: a path is a string there
        if "." in name:
            keys[name] = value
        elif name in OPTION_KEYS:
            keys[OPTION_KEYS[name]] = value
        else:
            known = ", ".join(sorted(OPTION_KEYS))
            raise TypeError(f"unknown option {name!r}: use one of {known}, or a dotted job key like 'request.temperature'")
    return keys


def _spec(job: str | Path | JobSpec | None, overrides: Mapping[str, Any]) -> JobSpec:
    from batch.simulator import table_problem

    if isinstance(job, JobSpec):
        if overrides:
            raise TypeError("overrides go with a job file; a JobSpec is already complete")
        return job
    return load_job(job, _overrides(overrides), check_simulator=table_problem)


async def _run_spec(spec: JobSpec, opts: RunOptions) -> Summary:
    """``run_job``, with the built-in simulator started for ``base_url = "simulator"``."""
    opts.handle_signals = False  # the caller's process, the caller's signals
    simulator = None
    if spec.api.is_simulator and opts.base_url is None:
        from batch.simulator import SimServer, config_from_table

        simulator = await anyio.to_thread.run_sync(SimServer(config_from_table(spec.simulator or {})).start)
        opts.base_url = simulator.base_url
    try:
        return await run_job(spec, opts)
    except JobStopped as exc:
        exc.summary = opts.summary
        raise
    finally:
        if simulator is not None:
            await anyio.to_thread.run_sync(simulator.stop)


async def arun(
    job: str | Path | JobSpec | None = None,
    *,
    date: date | None = None,
    fresh: bool = False,
    retry_failed: bool = True,
    **overrides: Any,
) -> Summary:
    """Run a job (a job file, a :class:`JobSpec`, or ``None`` with every setting in ``overrides``).

    ``overrides`` are the options of ``promptmill run`` (``input``, ``output``,
    ``model``, ``concurrency``, ...) or dotted job keys (``**{"request.temperature": 0.2}``).
    ``date`` fills ``{date}``/``{ds}`` in the output path. The output is resumed
    like the command resumes it. Returns the run's summary.
    """
    spec = _spec(job, overrides)
    if spec.engine.kind != "local":
        raise UsageError(f"engine {spec.engine.kind!r}: the Python API runs jobs on this machine; "
                         "run it with `promptmill run JOB --engine ray`")
    return await _run_spec(spec, RunOptions(fresh=fresh, retry_failed=retry_failed, progress=False, date=date))


def run(
    job: str | Path | JobSpec | None = None,
    *,
    date: date | None = None,
    fresh: bool = False,
    retry_failed: bool = True,
    **overrides: Any,
) -> Summary:
    """:func:`arun`, for code that is not async (see the module docstring for a running loop)."""
    return _sync(lambda: arun(job, date=date, fresh=fresh, retry_failed=retry_failed, **overrides))


def _rows_table(rows: Any) -> pa.Table:
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        return pa.Table.from_pylist(list(rows))
    if type(rows).__module__.startswith("pandas"):
        return pa.Table.from_pandas(rows, preserve_index=False)
    raise TypeError(f"rows must be a pyarrow Table, a list of dicts or a pandas DataFrame, not {type(rows).__name__}")


async def acomplete(
    rows: Any,
    *,
    model: str,
    base_url: str,
    template: str | None = None,
    prompt_column: str = "prompt",
    id_column: str | None = None,
    output: str | Path | None = None,
    api_key_env: str | None = None,
    max_tokens: int | None = None,
    concurrency: int | None = None,
    fresh: bool = False,
    **request: Any,
) -> pa.Table:
    """Complete every row and return the results table (the output file's columns and rows).

    ``rows``: a pyarrow Table, a list of dicts or a pandas DataFrame, with a
    ``prompt`` column (or ``prompt_column``), or the columns ``template``
    names (``"Summarise: {text}"``). Rows without an ``id`` column are numbered
    from 0. ``request`` holds further request fields (``temperature=0.2``).
    With ``output``, the results are also kept there and a second call
    resumes them (the rows are kept beside it, in ``OUT.input.parquet``);
    without, they live in a temporary folder for the call's lifetime.
    """
    import pyarrow.parquet as pq

    table = _rows_table(rows)
    settings: dict[str, Any] = {
        "model": model, "base_url": base_url, "api_key_env": api_key_env, "max_tokens": max_tokens,
        "concurrency": concurrency, "input.prompt_column": prompt_column,
        "input.prompt_template": template, "input.id_column": id_column, "job.name": "complete",
        **{f"request.{name}": value for name, value in request.items()},
    }
    with tempfile.TemporaryDirectory(prefix="promptmill-") as tmp:
        out = Path(output) if output is not None else Path(tmp) / "results.parquet"
        # beside a kept output, so the job (its identity is its input's path) resumes on the next call
        inp = out.with_name(out.name + ".input.parquet") if output is not None else Path(tmp) / "rows.parquet"
        inp.parent.mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(pq.write_table, table, inp)
        spec = _spec(None, {"input": inp, "output": str(out), **settings})
        await _run_spec(spec, RunOptions(fresh=fresh, progress=False))
        result: pa.Table = await anyio.to_thread.run_sync(pq.read_table, out)
        return result


def complete(rows: Any, *, model: str, base_url: str, template: str | None = None, **options: Any) -> pa.Table:
    """:func:`acomplete`, for code that is not async (see the module docstring for a running loop)."""
    return _sync(lambda: acomplete(rows, model=model, base_url=base_url, template=template, **options))


def _sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to the end: here, or in a worker thread when this thread's loop is running."""

    async def call() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(call)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptmill") as pool:
        return pool.submit(anyio.run, call).result()
