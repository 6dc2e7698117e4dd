"""Process tuning: what makes the ``promptmill`` command start, run and exit faster.

Nothing here changes what a job does: take any of it away and promptmill gives
the same output, only slower or larger. The figures are in the README
(Performance). Only the command tunes its process (:func:`tuned_process`,
:func:`exit_at_once`); a library user's process is left as it is, except that
:func:`compute` keeps ``pyarrow.compute`` unloaded until a large input needs it.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NoReturn

__all__ = ["compute", "event_loop_options", "exit_at_once", "restore_skipped_modules", "tuned_process"]


@contextmanager
def tuned_process() -> Iterator[None]:
    """Load the job's modules inside this block; on leaving it, tune the process for the job.

    Call it once, in a fresh ``promptmill`` process, around the imports of the
    runner. Each trick:

    - httpx's own command line (click and friends) and pyarrow's cloud
      filesystems are marked absent: a job never uses them (it reads and writes
      local files), and each treats a failed import as "not installed";
    - the cyclic collector is off while the imports build their few hundred
      thousand long-lived objects, which are then frozen: why walk them at every
      full collection of the job;
    - a young-generation pass every 20,000 allocations instead of 700: every
      request makes and drops a few hundred objects, none of them in cycles;
    - Arrow allocates from jemalloc where the build has it: mimalloc, the wheels'
      default, keeps much of what a pass over a large input used.

    In a process that has loaded the runner already (tests, an embedding app),
    only the imports run: a caller's garbage must not be frozen, nor its
    collector or allocator changed.
    """
    fresh_process = "batch.runner" not in sys.modules
    _skip_unused_modules()
    gc.disable()
    try:
        yield
    finally:
        if fresh_process:
            gc.freeze()
        gc.enable()
    if fresh_process:
        gc.set_threshold(20_000, 10, 10)
        _use_jemalloc()


def _skip_unused_modules() -> None:
    # each treats a failed import as "not installed"; once its package is loaded
    # the part may be in use already, so it is left alone
    names = ["httpx._main"] if "httpx" not in sys.modules else []
    if "pyarrow.fs" not in sys.modules:
        names += ["pyarrow._s3fs", "pyarrow._gcsfs", "pyarrow._hdfs", "pyarrow._azurefs"]
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def restore_skipped_modules() -> None:
    """Undo :func:`_skip_unused_modules` for a job that needs them after all (Ray Data reads
    through pyarrow's cloud filesystems): unmark them and load ``pyarrow.fs`` again."""
    skipped = [name for name, module in list(sys.modules.items()) if module is None]
    for name in skipped:
        del sys.modules[name]
    if any(name.startswith("pyarrow.") for name in skipped) and "pyarrow.fs" in sys.modules:
        importlib.reload(sys.modules["pyarrow.fs"])


def _use_jemalloc() -> None:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a build without jemalloc keeps its default
        return
    pa.set_memory_pool(pool)


def event_loop_options() -> dict[str, Any]:
    """anyio's asyncio options: uvloop where it is installed (less CPU per request than asyncio's loop)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {"use_uvloop": False}
    return {"use_uvloop": True}


def compute() -> ModuleType:
    """``pyarrow.compute``, loaded on first use: a job below 65,536 rows never needs it, and loading it costs start-up time and memory."""
    return importlib.import_module("pyarrow.compute")


def exit_at_once(code: int) -> NoReturn:
    """Flush the logs and standard streams, then exit without tearing the interpreter down.

    Why: by then every file is written, fsynced and closed; freeing Arrow, httpx
    and the event loop's threads object by object would only delay the exit.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
