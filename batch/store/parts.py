"""Parts: the progress of a run, written durably as it goes, next to the output ``OUT``::

    OUT.parts/
        lock                     held (flock) by the run writing this output
        job.json                 the identity of the job writing this output
        run-0003-part-000017.arrow

Workers hand finished rows to :meth:`PartWriter.add`, which appends them to
columnar buffers (no per-row object outlives the call). :meth:`PartWriter.take`
swaps the buffer out as a table and :meth:`PartWriter.write` writes it with
:func:`~batch.store.atomic.atomic_write`, so a part on disk is always whole and a
kill loses at most the rows in flight and in the buffer.

Parts are Arrow IPC files (zstd-compressed buffers): as small on disk as Parquet
parts, but written and read back several times faster (README, Performance; a
million-row job writes and merges thousands of them). Parquet parts of
earlier versions are still read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from batch.arrowutil import array_of, read_parquet_columns
from batch.errors import DiskError, OutputError
from batch.records import Result
from batch.store.atomic import atomic_write
from batch.store.schema import EXTRA_FIELDS, RESULT_NAMES

__all__ = ["PART_RE", "PartWriter", "next_run_number", "part_files", "parts_dir", "read_columns", "source_batches",
           "sources"]

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^run-(\d{4,})-part-(\d{6,})\.(?:arrow|parquet)$")
_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")
# what building a column raises for a value it cannot hold (an int beyond 64 bits, a lone surrogate)
_UNSTORABLE = (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError)
# the columns a row written failed for an unstorable value keeps
_KEPT_ON_FAILURE = frozenset({"model", "endpoint", "attempts", "latency_s", "request_fingerprint", "variant",
                              "sample", "params", "finished_at"})


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _write_part(table: pa.Table, path: Path) -> None:
    """A part: an Arrow IPC file, written atomically and durably."""

    def write(fh: BinaryIO) -> None:
        with ipc.new_file(fh, table.schema, options=_IPC_OPTIONS) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def _is_part_ipc(path: Path) -> bool:
    return path.suffix == ".arrow"


def _read_ipc(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as f:
        return ipc.open_file(f).read_all()


def part_files(output: Path) -> list[Path]:
    """The parts of ``output``, oldest first."""
    folder = parts_dir(output)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = PART_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return [p for _, _, p in sorted(found)]


def next_run_number(output: Path) -> int:
    runs = [int(m.group(1)) for p in part_files(output) if (m := PART_RE.match(p.name))]
    return max(runs, default=0) + 1


def sources(output: Path) -> list[Path]:
    """Where the rows of ``output`` are: the assembled file (if any), then every part, oldest first."""
    return ([output] if output.is_file() else []) + part_files(output)


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    try:
        if _is_part_ipc(path):
            return _read_ipc(path).select(columns)
        return read_parquet_columns(path, columns)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read earlier progress ({exc}); rerun with --fresh to start over", path=path) from None


def source_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a part (Arrow IPC, or Parquet from earlier versions) or of an output."""
    if _is_part_ipc(path):
        table = _read_ipc(path)
        return iter((table.select(columns) if columns else table).to_batches())
    batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(
        batch_size=65536, columns=columns, use_threads=False
    )
    return batches


class PartWriter:
    """Columnar buffers for finished rows, written as whole parts."""

    def __init__(self, output: Path, schema: pa.Schema, run: int) -> None:
        self.output = output
        self.schema = schema
        self.run = run
        self._folder = parts_dir(output)
        self._folder.mkdir(parents=True, exist_ok=True)
        # id, the pass-through columns, the result columns, then those some jobs ask for (EXTRA_FIELDS,
        # set from the Result) or (a structured job) the parsed answer's (from ``Result.columns``)
        first = schema.get_field_index(RESULT_NAMES[0])
        self._passthrough = schema.names[1:first]
        after = schema.names[first + len(RESULT_NAMES):]
        self._results = (*RESULT_NAMES, *(n for n in after if n in EXTRA_FIELDS))
        self._direct = tuple(n for n in self._results if n != "request_fingerprint")
        self._extra = [n for n in after if n not in EXTRA_FIELDS]
        self._part = 0
        self.rows_flushed = 0
        self.unwritten: list[pa.Table] = []
        self._reset()

    def _reset(self) -> None:
        self._ids: list[str] = []
        self._pass: dict[str, list[Any]] = {n: [] for n in self._passthrough}
        self._cols: dict[str, list[Any]] = {n: [] for n in self._results}
        self._more: dict[str, list[Any]] = {n: [] for n in self._extra}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, result: Result) -> None:
        self._ids.append(result.id)
        values = result.passthrough
        for name, col in self._pass.items():
            col.append(values.get(name))
        cols = self._cols
        for name in self._direct:
            cols[name].append(getattr(result, name))
        cols["request_fingerprint"].append(result.fingerprint)
        if self._extra:
            more = result.columns or {}
            for name, col in self._more.items():
                col.append(more.get(name))

    def take(self) -> pa.Table | None:
        """Swap out the buffer as a table (on the event loop), to be written by :meth:`write`.

        A row holding a value its column cannot store (the client checks answers
        where they enter; this is the second line of defence) is written failed
        with the reason, and every other row of the part is kept.
        """
        if not self._ids:
            return None
        try:
            table = self._table()
        except _UNSTORABLE:
            self._fail_unstorable_rows()
            table = self._table()
        self._reset()
        return table

    def _table(self) -> pa.Table:
        arrays = [pa.array(self._ids, pa.string())]
        arrays += [pa.array(self._pass[name], self.schema.field(name).type) for name in self._passthrough]
        arrays += [pa.array(self._cols[name], self.schema.field(name).type) for name in self._results]
        arrays += [array_of(self._more[name], self.schema.field(name).type) for name in self._extra]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _fail_unstorable_rows(self) -> None:
        """Find each row a column refuses; keep its id, pass-through values and key, fail the rest."""
        types = {f.name: f.type for f in self.schema}
        for i in range(len(self._ids)):
            bad = None
            for name, col in (("id", self._ids), *self._pass.items(), *self._cols.items(), *self._more.items()):
                try:
                    array_of([col[i]], types[name])
                except _UNSTORABLE as exc:
                    bad = (name, col[i], type(exc).__name__)
                    break
            if bad is None:
                continue
            name, value, why = bad
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:79] + "…"
            reason = f"the answer could not be stored: column '{name}' cannot hold {shown} ({why})"
            log.warning("row %s: %s; written as failed", self._ids[i] if name != "id" else f"#{i}", reason)
            if name == "id":
                self._ids[i] = f"<unstorable id {i}>"
            for pname, col in self._pass.items():
                try:
                    pa.array([col[i]], types[pname])
                except _UNSTORABLE:
                    col[i] = None
            cols = self._cols
            for cname in self._results:
                if cname not in _KEPT_ON_FAILURE:
                    cols[cname][i] = None
            for col in self._more.values():
                col[i] = None
            cols["status"][i] = "failed"
            cols["error_code"][i] = "bad_response"
            cols["error"][i] = reason

    def write(self, table: pa.Table) -> Path:
        """Write one part durably (safe to call from a worker thread).

        On a disk error the table is kept (:attr:`unwritten`) for a later call
        to try again, and :class:`DiskError` names the part and the cause.
        """
        self._part += 1
        path = self._folder / f"run-{self.run:04d}-part-{self._part:06d}.arrow"
        try:
            _write_part(table, path)
        except OSError as exc:
            self.unwritten.append(table)
            raise DiskError(exc, path=path, what="a part of progress") from None
        self.rows_flushed += table.num_rows
        return path

    def write_unwritten(self) -> None:
        """Try again the parts a disk error kept from being written."""
        while self.unwritten:
            self.write(self.unwritten.pop(0))

    def flush(self) -> None:
        table = self.take()
        if table is not None:
            self.write(table)
