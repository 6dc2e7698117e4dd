"""Results to Parquet, durable as the job goes.

Layout next to the output file ``OUT`` (for example ``out/results.parquet``)::

    OUT                          the assembled output, replaced atomically at the end
    OUT.parts/                   progress of runs that have not been assembled yet
        lock                     held (flock) by the run writing this output
        job.json                 the identity of the job writing this output
        run-0003-part-000017.arrow

Workers hand finished rows to :meth:`PartWriter.add`, which appends them to
columnar buffers (no per-row object outlives the call). The writer task calls
:meth:`PartWriter.flush` when enough rows or time have gone by: the buffer is
written to a temporary name, fsynced and renamed, so a part on disk is always
whole and a kill loses at most the rows in flight and in the buffer.

Parts are Arrow IPC files (zstd-compressed buffers): as small on disk as Parquet
parts, but written and read back several times faster (README, Performance; a
million-row job writes and merges thousands of them). Parquet parts of
earlier versions are still read.

At the end :func:`assemble` merges the previous output and every part into one
file (streaming, part by part), keeping for each id only its newest row, and
renames it over ``OUT``. :func:`load_index` reads only the id, fingerprint and
status columns of the same sources to decide which rows a rerun can skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from batch._startup import compute
from batch.arrowutil import hashes_repeat, read_parquet_columns
from batch.errors import DiskError, OutputError
from batch.records import Result

__all__ = [
    "RESULT_FIELDS",
    "OutputLock",
    "PartWriter",
    "ResumeIndex",
    "assemble",
    "check_not_input",
    "check_output_ours",
    "check_output_writable",
    "discard_progress",
    "is_promptmill_output",
    "load_index",
    "next_run_number",
    "output_schema",
    "output_target",
    "parts_dir",
    "read_job_identity",
    "remove_parts_dir",
    "write_job_identity",
]

log = logging.getLogger(__name__)

#: The result columns, in output order, after the id and the pass-through columns.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("model", pa.string()),
    pa.field("endpoint", pa.string()),
    pa.field("status", pa.string()),
    pa.field("text", pa.string()),
    pa.field("refusal", pa.string()),  # the model's refusal, when it gave one instead of text
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("ttft_s", pa.float64()),
    pa.field("attempts", pa.int32()),
    pa.field("http_status", pa.int32()),
    pa.field("error_code", pa.string()),
    pa.field("error", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("created", pa.timestamp("us", tz="UTC")),
    pa.field("system_fingerprint", pa.string()),
    # the key a rerun uses to recognise a finished row: a hash of the request body
    pa.field("request_fingerprint", pa.string()),
)
_RESULT_NAMES = tuple(f.name for f in RESULT_FIELDS)
# Result attributes that map 1:1 onto columns of the same name
_DIRECT = tuple(n for n in _RESULT_NAMES if n != "request_fingerprint")

METADATA_KEY = b"promptmill.job"
# rows of a row group of the assembled output: the writer holds one encoded group
# in memory (about 6 MB at 8k rows of ~700-byte answers)
_ROW_GROUP_ROWS = 8_192
# columns whose values are all or nearly all different: a dictionary page there
# is built, found useless and thrown away for every row group
_NO_DICTIONARY = frozenset({"id", "text", "response_id", "request_fingerprint", "latency_s", "ttft_s", "created"})
# between id and request fingerprint in a resume key (a fingerprint is hex, so never holds it)
_KEY_SEP = "\x1f"
_PART_RE = re.compile(r"^run-(\d{4,})-part-(\d{6,})\.(?:arrow|parquet)$")
_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")
# what building a column raises for a value it cannot hold (an int beyond 64 bits, a lone surrogate)
_UNSTORABLE = (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError)
# the columns a row written failed for an unstorable value keeps
_KEPT_ON_FAILURE = frozenset({"model", "endpoint", "attempts", "latency_s", "request_fingerprint"})


def output_schema(passthrough: pa.Schema, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    """The output's fixed schema: ``id``, the pass-through columns, then the result columns."""
    fields = [pa.field("id", pa.string()), *passthrough, *RESULT_FIELDS]
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def check_not_input(output: Path, inp: Path) -> None:
    """Refuse an output that is the input file, after links and in any spelling, whatever the flags."""
    same = os.path.realpath(output) == os.path.realpath(inp)
    if not same:
        with contextlib.suppress(OSError):
            same = output.exists() and os.path.samefile(output, inp)
    if same:
        raise OutputError(
            f"the output is the input file {inp}: promptmill never writes its input; choose another output",
            path=output,
        )


def output_target(output: Path) -> Path:
    """Where the output's bytes go: through a symbolic link to its target, never replacing the link."""
    return Path(os.path.realpath(output)) if output.is_symlink() else output


def is_promptmill_output(output: Path) -> bool:
    """Whether the file at ``output`` is a Parquet file carrying promptmill's metadata."""
    try:
        meta = pq.read_schema(output).metadata or {}
    except (OSError, pa.ArrowException, ValueError):
        return False
    return METADATA_KEY in meta


def check_output_ours(output: Path) -> None:
    """Refuse to read, replace or mix with an existing file promptmill did not write (``--fresh`` included)."""
    if output.is_file() and not is_promptmill_output(output):
        raise OutputError(
            "a file that promptmill did not write is in the way (no promptmill metadata); it is never "
            "replaced, not even with --fresh: move it away or choose another output",
            path=output,
        )


def check_output_writable(output: Path) -> None:
    """Create the output's folder and prove it is writable, before any request is sent."""
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=folder) from None
    if output.is_dir():
        raise OutputError("the output path is a folder; give a file name ending in .parquet", path=output)
    probe = folder / f".promptmill-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"the output folder is not writable: {exc.strerror}", path=folder) from None


class OutputLock:
    """An exclusive lock on one output, held for a run's lifetime.

    ``flock`` is released by the kernel when the process dies, so a killed run
    never leaves the output locked.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = parts_dir(output) / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (process {int(self.path.read_text().strip())})"
                raise OutputError(
                    f"another promptmill run is writing this output{holder}; wait for it or choose another output",
                    path=self.output,
                ) from None
            # The run that held it may have removed the folder (lock file included) as it
            # finished: a lock on that deleted file protects nothing, so take the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(table: pa.Table, path: Path) -> None:
    """A part: an Arrow IPC file, written under a temporary name, fsynced and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            with ipc.new_file(fh, table.schema, options=_IPC_OPTIONS) as writer:
                writer.write_table(table)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # half a part takes space and is never read: gone
        raise
    _fsync_dir(path.parent)


def _is_part_ipc(path: Path) -> bool:
    return path.suffix == ".arrow"


def _read_ipc(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as f:
        return ipc.open_file(f).read_all()


def _part_files(output: Path) -> list[Path]:
    folder = parts_dir(output)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _PART_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return [p for _, _, p in sorted(found)]


def next_run_number(output: Path) -> int:
    runs = [int(m.group(1)) for p in _part_files(output) if (m := _PART_RE.match(p.name))]
    return max(runs, default=0) + 1


def write_job_identity(output: Path, identity: Mapping[str, Any]) -> None:
    folder = parts_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "job.json"
    tmp = folder / ".job.json.tmp"
    tmp.write_text(json.dumps(dict(identity), sort_keys=True, indent=2))
    os.replace(tmp, target)


def read_job_identity(output: Path) -> dict[str, Any] | None:
    """The identity recorded by the run that last wrote this output (parts first, then the file)."""
    job_file = parts_dir(output) / "job.json"
    if job_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(job_file.read_text())
            if isinstance(data, dict):
                return data
    if output.is_file():
        try:
            meta = pq.read_schema(output).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return None
        raw = meta.get(METADATA_KEY)
        if raw:
            with contextlib.suppress(ValueError):
                data = json.loads(raw)
                if isinstance(data, dict) and isinstance(data.get("identity"), dict):
                    return dict(data["identity"])
    return None


def discard_progress(output: Path) -> None:
    """``--fresh``: forget every earlier run of this output."""
    folder = parts_dir(output)
    for p in _part_files(output):
        p.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / "job.json").unlink()
    check_output_ours(output)
    output_target(output).unlink(missing_ok=True)


class PartWriter:
    """Columnar buffers for finished rows, flushed as whole Parquet parts."""

    def __init__(self, output: Path, schema: pa.Schema, run: int) -> None:
        self.output = output
        self.schema = schema
        self.run = run
        self._folder = parts_dir(output)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._passthrough = [f.name for f in schema if f.name != "id" and f.name not in _RESULT_NAMES]
        self._part = 0
        self.rows_flushed = 0
        self.unwritten: list[pa.Table] = []
        self._reset()

    def _reset(self) -> None:
        self._ids: list[str] = []
        self._pass: dict[str, list[Any]] = {n: [] for n in self._passthrough}
        self._cols: dict[str, list[Any]] = {n: [] for n in _RESULT_NAMES}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, result: Result) -> None:
        self._ids.append(result.id)
        values = result.passthrough
        for name, col in self._pass.items():
            col.append(values.get(name))
        cols = self._cols
        for name in _DIRECT:
            cols[name].append(getattr(result, name))
        cols["request_fingerprint"].append(result.fingerprint)

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
        arrays += [pa.array(self._pass[f.name], f.type) for f in self.schema if f.name in self._pass]
        arrays += [pa.array(self._cols[f.name], f.type) for f in RESULT_FIELDS]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _fail_unstorable_rows(self) -> None:
        """Find each row a column refuses; keep its id, pass-through values and key, fail the rest."""
        types = {f.name: f.type for f in self.schema}
        for i in range(len(self._ids)):
            bad = None
            for name, col in (("id", self._ids), *self._pass.items(), *self._cols.items()):
                try:
                    pa.array([col[i]], types[name])
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
            for cname in _RESULT_NAMES:
                if cname not in _KEPT_ON_FAILURE:
                    cols[cname][i] = None
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
            _write_atomically(table, path)
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


def _sources(output: Path) -> list[Path]:
    return ([output] if output.is_file() else []) + _part_files(output)


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    try:
        if _is_part_ipc(path):
            return _read_ipc(path).select(columns)
        return read_parquet_columns(path, columns)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read earlier progress ({exc}); rerun with --fresh to start over", path=path) from None


def _latest_rows(sources: list[Path]) -> tuple[pa.Table, list[int]]:
    """id, fingerprint and status of every source row, plus which global rows are each id's newest."""
    tables = []
    offsets = [0]
    for path in sources:
        t = _read_columns(path, ["id", "request_fingerprint", "status"])
        tables.append(t)
        offsets.append(offsets[-1] + t.num_rows)
    if not tables:
        empty = pa.table({"id": pa.array([], pa.string()), "request_fingerprint": pa.array([], pa.string()),
                          "status": pa.array([], pa.string())})
        return empty, offsets
    all_rows = pa.concat_tables(tables).combine_chunks()
    return all_rows, offsets


def _id_hashes(sources: list[Path]) -> tuple[array[int], list[int]]:
    """The hash of every source row's id, in order, and where each source starts."""
    hashes: array[int] = array("q")
    offsets = [0]
    for path in sources:
        try:
            for batch in _source_batches(path, ["id"]):
                hashes.extend(map(hash, batch.column(0).to_pylist()))
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read earlier progress ({exc}); rerun with --fresh to start over", path=path) from None
        offsets.append(len(hashes))
    return hashes, offsets


def _source_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a part (Arrow IPC, or Parquet from earlier versions) or of an output."""
    if _is_part_ipc(path):
        table = _read_ipc(path)
        return iter((table.select(columns) if columns else table).to_batches())
    batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(
        batch_size=65536, columns=columns, use_threads=False
    )
    return batches


def _winners(all_rows: pa.Table) -> pa.Array:
    """A boolean mask: True where a row is the newest for its id."""
    pc = compute()

    n = all_rows.num_rows
    if n == 0:
        return pa.array([], pa.bool_())
    seq = pa.array(range(n), pa.int64())
    grouped = pa.table({"id": all_rows["id"], "seq": seq}).group_by("id").aggregate([("seq", "max")])
    return pc.is_in(seq, value_set=grouped["seq_max"])


@dataclass(slots=True)
class ResumeIndex:
    """The (id, request fingerprint) keys a rerun may skip, as sorted arrays of hashes.

    8 bytes a finished row: a million-row output costs 8 MB. A key is the Python
    ``hash`` of ``id + "\\x1f" + fingerprint`` in this process, so it never leaves it.
    ``failed_keys`` holds the failed rows a rerun keeps (``--no-retry-failed``);
    a lookup that finds one counts it in ``failed_skipped``.
    """

    keys: array[int]  # array('q'), sorted: rows done ok
    rows_ok: int
    rows_failed: int
    failed_keys: array[int] = field(default_factory=lambda: array("q"))  # sorted
    failed_skipped: int = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        h = hash(f"{key[0]}{_KEY_SEP}{key[1]}")
        if _holds(self.keys, h):
            return True
        if self.failed_keys and _holds(self.failed_keys, h):
            self.failed_skipped += 1
            return True
        return False

    def __len__(self) -> int:
        return len(self.keys) + len(self.failed_keys)


def _holds(keys: array[int], h: int) -> bool:
    i = bisect_left(keys, h)
    return i < len(keys) and keys[i] == h


def load_index(output: Path, *, include_failed: bool = False) -> ResumeIndex:
    """What earlier runs finished: the newest row of each id, if ok (or failed too, when asked).

    Fast on a million rows: three columns are read, the keys are joined in Arrow,
    hashed by ``map(hash, ...)`` and sorted in Arrow; no per-row Python loop.
    """
    sources = _sources(output)
    all_rows, _ = _latest_rows(sources)
    if all_rows.num_rows == 0:
        return ResumeIndex(array("q"), 0, 0)
    # an assembled output alone holds each id once: only parts can repeat one
    latest = all_rows if sources == [output] else all_rows.filter(_winners(all_rows))
    pc = compute()

    ok = pc.fill_null(pc.equal(latest["status"], "ok"), False)
    rows_ok = pc.sum(ok).as_py() or 0

    def keys(rows: pa.Table) -> array[int]:
        joined = pc.binary_join_element_wise(rows["id"], pc.fill_null(rows["request_fingerprint"], ""), _KEY_SEP)
        return _sorted_keys(array("q", map(hash, joined.to_pylist())))

    failed = keys(latest.filter(pc.invert(ok))) if include_failed else array("q")
    return ResumeIndex(keys(latest.filter(ok)), rows_ok, latest.num_rows - rows_ok, failed)


def _sorted_keys(keys: array[int]) -> array[int]:
    """Sort 64-bit keys in Arrow (a few times faster than ``sorted`` on a million)."""
    pc = compute()

    if not keys:
        return keys
    arr = pa.Array.from_buffers(pa.int64(), len(keys), [None, pa.py_buffer(keys)])
    ordered = pc.take(arr, pc.sort_indices(arr))
    out = array("q")
    out.frombytes(memoryview(ordered.buffers()[1])[: len(keys) * 8])
    return out


def _iter_source_batches(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for batch in _source_batches(path):
        table = pa.Table.from_batches([batch])
        if table.schema.remove_metadata() != schema.remove_metadata():
            table = _conform(table, schema, path)
        yield from table.to_batches()


def _conform(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    """Bring a table of an earlier run to the current schema (columns added or dropped since)."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            col = table[f.name]
            try:
                arrays.append(col.cast(f.type) if col.type != f.type else col)
            except pa.ArrowInvalid:
                raise OutputError(
                    f"column '{f.name}' of earlier progress has type {col.type}, now {f.type}; rerun with --fresh",
                    path=path,
                ) from None
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def assemble(output: Path, schema: pa.Schema) -> int:
    """Merge the previous output and every part into ``output``, atomically. Returns the row count.

    Memory stays bounded by one batch of one source plus the id column of all
    of them; the parts are removed once the new output is in place.
    """
    sources = _sources(output)
    # Usually no id repeats (a first run, or a rerun that redid nothing): 8 bytes
    # an id prove it. Only otherwise are the ids themselves grouped to find each
    # one's newest row.
    mask = None
    runs = {m.group(1) for p in sources if (m := _PART_RE.match(p.name))}
    if output in sources or len(runs) > 1:
        # ids are unique within one run (the input's are checked, each row is done
        # once); only an earlier run's rows can repeat one
        hashes, offsets = _id_hashes(sources)
        if hashes_repeat(hashes):
            mask = _winners(_latest_rows(sources)[0])
        del hashes
        pa.default_memory_pool().release_unused()
    else:
        offsets = [0] * (len(sources) + 1)  # row positions matter only with a mask
    target = output_target(output)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        total = _merge(sources, offsets, mask, schema, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DiskError(exc, path=target, what="the output") from None
    _fsync_dir(target.parent)
    for p in _part_files(output):
        p.unlink(missing_ok=True)
    return total


def _merge(sources: list[Path], offsets: list[int], mask: pa.Array | None, schema: pa.Schema, tmp: Path) -> int:
    """Write every source's rows (those ``mask`` keeps) to ``tmp`` as one Parquet file, fsynced."""
    total = 0
    with open(tmp, "wb") as fh:
        dictionary = [name for name in schema.names if name not in _NO_DICTIONARY]
        writer = pq.ParquetWriter(fh, schema, compression="zstd", use_dictionary=dictionary)
        # Parts are small; written one by one they would make thousands of tiny row
        # groups, whose metadata the writer holds until it closes. Gather them instead.
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        try:
            for i, path in enumerate(sources):
                start = offsets[i]
                for batch in _iter_source_batches(path, schema):
                    kept = batch if mask is None else batch.filter(mask.slice(start, batch.num_rows))
                    start += batch.num_rows
                    if kept.num_rows:
                        pending.append(kept)
                        pending_rows += kept.num_rows
                        total += kept.num_rows
                    if pending_rows >= _ROW_GROUP_ROWS:
                        writer.write_table(pa.Table.from_batches(pending, schema=schema))
                        pending, pending_rows = [], 0
            if pending or total == 0:
                writer.write_table(pa.Table.from_batches(pending, schema=schema))
        finally:
            writer.close()
        fh.flush()
        os.fsync(fh.fileno())
    return total


def remove_parts_dir(output: Path) -> None:
    """After a clean assembly: drop the parts folder (lock and identity included)."""
    shutil.rmtree(parts_dir(output), ignore_errors=True)
