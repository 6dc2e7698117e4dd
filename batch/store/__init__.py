"""The output store: one object owns everything promptmill keeps next to an output ``OUT``.

Layout (for example ``out/results.parquet``)::

    OUT                          the assembled output, replaced atomically at the end
    OUT.summary.json             the last run's summary
    OUT.parts/                   progress of runs that have not been assembled yet
        lock                     held (flock) by the run writing this output
        job.json                 the identity of the job writing this output
        run-0003-part-000017.arrow

:meth:`OutputStore.open` takes the lock, checks (or, with ``fresh``, forgets)
the job that wrote the output before, records this job's identity and loads the
resume index. Rows go in with :meth:`~OutputStore.add`, out to disk as parts with
:meth:`~OutputStore.take` and :meth:`~OutputStore.write` (or :meth:`~OutputStore.flush`),
and :meth:`~OutputStore.assemble` merges them into the output at the end.
Every file is written by :func:`~batch.store.atomic.atomic_write`: whole, fsynced, folder too.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch.errors import DiskError, OutputError
from batch.records import Result
from batch.store import assembly
from batch.store.assembly import assemble
from batch.store.atomic import atomic_write, fsync_dir
from batch.store.checks import (
    check_not_input,
    check_output_ours,
    check_output_writable,
    is_promptmill_output,
    output_target,
)
from batch.store.identity import read_job_identity, write_job_identity
from batch.store.lock import OutputLock
from batch.store.parts import PartWriter, next_run_number, part_files, parts_dir
from batch.store.resume import PLAIN_KEY, SWEEP_KEY, ResumeIndex, load_index, sweep_key
from batch.store.schema import METADATA_KEY, RESULT_FIELDS, output_schema

if TYPE_CHECKING:
    from batch.summary import Summary

__all__ = [
    "METADATA_KEY",
    "PLAIN_KEY",
    "RESULT_FIELDS",
    "SWEEP_KEY",
    "OutputLock",
    "OutputStore",
    "PartWriter",
    "ResumeIndex",
    "assemble",
    "atomic_write",
    "check_not_input",
    "check_output_ours",
    "check_output_writable",
    "discard_progress",
    "fsync_dir",
    "is_promptmill_output",
    "load_index",
    "next_run_number",
    "output_schema",
    "output_target",
    "parts_dir",
    "read_job_identity",
    "remove_parts_dir",
    "summary_path",
    "sweep_key",
    "write_job_identity",
]


def discard_progress(output: Path) -> None:
    """``--fresh``: forget every earlier run of this output."""
    for p in part_files(output):
        p.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (parts_dir(output) / "job.json").unlink()
    check_output_ours(output)
    output_target(output).unlink(missing_ok=True)


def remove_parts_dir(output: Path) -> None:
    """After a clean assembly: drop the parts folder (lock and identity included)."""
    shutil.rmtree(parts_dir(output), ignore_errors=True)


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


class OutputStore:
    """One output, held by one run: its lock, parts, identity, resume index and assembly.

    Use as a context manager: leaving it without an error (the output assembled)
    removes the parts folder; the lock is released either way.
    """

    def __init__(self, path: Path, schema: pa.Schema, lock: OutputLock, index: ResumeIndex,
                 parts: PartWriter, key: tuple[str, ...] = PLAIN_KEY) -> None:
        self.path = path
        self.key = key
        self.schema = schema
        self.index = index
        self._lock = lock
        self._parts = parts

    @staticmethod
    def check(path: Path, input_path: Path) -> None:
        """Before anything is sent: the output is not the input, its folder is writable, and
        a file already there is one promptmill wrote."""
        check_not_input(path, input_path)
        check_output_writable(path)
        check_output_ours(path)

    @classmethod
    def open(cls, path: Path, identity: Mapping[str, Any], schema: pa.Schema, *, fresh: bool = False,
             keep_failed: bool = False, key: tuple[str, ...] = PLAIN_KEY) -> OutputStore:
        """Lock ``path`` for this run and load what earlier runs of the same job finished.

        ``fresh`` forgets every earlier run; otherwise an output another job wrote is
        refused. ``keep_failed``: the index holds the failed rows too (``--no-retry-failed``).
        ``key``: what identifies a row across runs: the id (a plain job) or ``SWEEP_KEY``.
        """
        lock = OutputLock(path)
        lock.acquire()
        try:
            if fresh:
                discard_progress(path)
            else:
                previous = read_job_identity(path)
                if previous is not None and previous != dict(identity):
                    raise OutputError(
                        f"this output was written by another job ({previous.get('job')!r} reading "
                        f"{previous.get('input')}); choose another output, or pass --fresh to replace it",
                        path=path,
                    )
            write_job_identity(path, identity)
            index = load_index(path, include_failed=keep_failed, key=key)
            parts = PartWriter(path, schema, next_run_number(path))
        except BaseException:
            lock.release()
            raise
        return cls(path, schema, lock, index, parts, key)

    # -- rows to parts -------------------------------------------------------

    def add(self, result: Result) -> None:
        """Buffer one finished row (on the event loop; no disk)."""
        self._parts.add(result)

    def __len__(self) -> int:
        """Rows buffered, not yet taken for a part."""
        return len(self._parts)

    def take(self) -> pa.Table | None:
        """Swap out the buffered rows as a table (on the event loop), for :meth:`write`."""
        return self._parts.take()

    def write(self, table: pa.Table) -> Path:
        """Write one part durably (in a worker thread); a disk error keeps it for :meth:`write_unwritten`."""
        return self._parts.write(table)

    @property
    def unwritten(self) -> list[pa.Table]:
        """Parts a disk error kept from being written."""
        return self._parts.unwritten

    def write_unwritten(self) -> None:
        self._parts.write_unwritten()

    def flush(self) -> None:
        """Write what is kept and buffered, now (for callers without an event loop)."""
        self.write_unwritten()
        self._parts.flush()

    @property
    def rows_not_on_disk(self) -> int:
        unwritten: int = sum(t.num_rows for t in self._parts.unwritten)
        return len(self._parts) + unwritten

    # -- the end -------------------------------------------------------------

    def assemble(self) -> int:
        """Merge the earlier output and every part into the output, atomically; the row count."""
        if self.key == PLAIN_KEY:
            rows: int = assembly.assemble(self.path, self.schema)
        else:
            rows = assembly.assemble(self.path, self.schema, self.key)
        return rows

    def write_summary(self, summary: Summary) -> Path:
        """The run's summary as JSON next to the output; :class:`DiskError` if it cannot be written."""
        path = summary_path(self.path)
        try:
            atomic_write(path, summary.to_json())
        except OSError as exc:
            raise DiskError(exc, path=path, what="the summary") from None
        return path

    def close(self, *, done: bool) -> None:
        """Release the lock; ``done`` (assembled cleanly): drop the parts folder first, while the
        lock is held, so a run starting now never sees the folder vanish under it."""
        try:
            if done:
                remove_parts_dir(self.path)
        finally:
            self._lock.release()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(done=kind is None)
