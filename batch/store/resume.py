"""The resume index: which rows earlier runs of an output finished, so a rerun skips them.

:func:`load_index` reads only the id, fingerprint and status columns of the
output and its parts; for each id only its newest row counts.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from batch._startup import compute
from batch.errors import OutputError
from batch.store.parts import read_columns, source_batches, sources

__all__ = ["PLAIN_KEY", "SWEEP_KEY", "ResumeIndex", "id_hashes", "latest_rows", "load_index", "sweep_key", "winners"]

# between id and request fingerprint in a resume key (a fingerprint is hex, so never holds it)
_KEY_SEP = "\x1f"


#: the resume key of a plain job's rows: the id alone; a sweep's is (id, variant, sample)
PLAIN_KEY = ("id",)
SWEEP_KEY = ("id", "variant", "sample")


def _keyed(path: Path, key: tuple[str, ...]) -> pa.Table:
    """id (the whole resume key, joined, when it has more columns), fingerprint and status of a source."""
    if key == PLAIN_KEY:
        return read_columns(path, ["id", "request_fingerprint", "status"])
    pc = compute()
    try:
        t = read_columns(path, [*key, "request_fingerprint", "status"])
    except (OutputError, KeyError):
        # an output written before the sweep's columns: its rows are sample 0 of no variant
        t = read_columns(path, ["id", "request_fingerprint", "status"])
        return t
    parts = [pc.fill_null(pc.cast(t[name], pa.string()), "") for name in key]
    joined = pc.binary_join_element_wise(*parts, _KEY_SEP)
    return pa.table({"id": joined, "request_fingerprint": t["request_fingerprint"], "status": t["status"]})


def latest_rows(sources: list[Path], key: tuple[str, ...] = PLAIN_KEY) -> tuple[pa.Table, list[int]]:
    """key (as "id"), fingerprint and status of every source row, plus which global rows are each key's newest."""
    tables = []
    offsets = [0]
    for path in sources:
        t = _keyed(path, key)
        tables.append(t)
        offsets.append(offsets[-1] + t.num_rows)
    if not tables:
        empty = pa.table({"id": pa.array([], pa.string()), "request_fingerprint": pa.array([], pa.string()),
                          "status": pa.array([], pa.string())})
        return empty, offsets
    all_rows = pa.concat_tables(tables).combine_chunks()
    return all_rows, offsets


def id_hashes(sources: list[Path], key: tuple[str, ...] = PLAIN_KEY) -> tuple[array[int], list[int]]:
    """The hash of every source row's id (resume key), in order, and where each source starts."""
    hashes: array[int] = array("q")
    offsets = [0]
    if key != PLAIN_KEY:
        for path in sources:
            hashes.extend(map(hash, _keyed(path, key)["id"].to_pylist()))
            offsets.append(len(hashes))
        return hashes, offsets
    for path in sources:
        try:
            for batch in source_batches(path, ["id"]):
                hashes.extend(map(hash, batch.column(0).to_pylist()))
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read earlier progress ({exc}); rerun with --fresh to start over", path=path) from None
        offsets.append(len(hashes))
    return hashes, offsets


def winners(all_rows: pa.Table) -> pa.Array:
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
    added: set[int] = field(default_factory=set)  # rows ok in parts other writers added since (see :meth:`add`)

    def __contains__(self, key: tuple[str, str]) -> bool:
        h = hash(f"{key[0]}{_KEY_SEP}{key[1]}")
        if _holds(self.keys, h) or h in self.added:
            return True
        if self.failed_keys and _holds(self.failed_keys, h):
            self.failed_skipped += 1
            return True
        return False

    def __len__(self) -> int:
        return len(self.keys) + len(self.failed_keys)

    def add(self, parts: list[Path], key: tuple[str, ...] = PLAIN_KEY) -> int:
        """Add the rows done ok in ``parts``, written since the index was loaded (by the other
        workers of a job on Ray); returns how many."""
        if not parts:
            return 0
        rows, _ = latest_rows(parts, key)
        ok = rows.filter(compute().fill_null(compute().equal(rows["status"], "ok"), False))
        self.added.update(_hashes(ok))
        return int(ok.num_rows)


def sweep_key(row_id: str, variant: str, sample: int) -> str:
    """The resume key of a sweep's row, as :func:`load_index` joins it (to look up with a fingerprint)."""
    return f"{row_id}{_KEY_SEP}{variant}{_KEY_SEP}{sample}"


def _holds(keys: array[int], h: int) -> bool:
    i = bisect_left(keys, h)
    return i < len(keys) and keys[i] == h


def load_index(output: Path, *, include_failed: bool = False, key: tuple[str, ...] = PLAIN_KEY) -> ResumeIndex:
    """What earlier runs finished: the newest row of each id, if ok (or failed too, when asked).

    Fast on a million rows: three columns are read, the keys are joined in Arrow,
    hashed by ``map(hash, ...)`` and sorted in Arrow; no per-row Python loop.
    """
    found = sources(output)
    all_rows, _ = latest_rows(found, key)
    if all_rows.num_rows == 0:
        return ResumeIndex(array("q"), 0, 0)
    # an assembled output alone holds each id once: only parts can repeat one
    latest = all_rows if found == [output] else all_rows.filter(winners(all_rows))
    pc = compute()

    ok = pc.fill_null(pc.equal(latest["status"], "ok"), False)
    rows_ok = pc.sum(ok).as_py() or 0

    def keys(rows: pa.Table) -> array[int]:
        return _sorted_keys(_hashes(rows))

    failed = keys(latest.filter(pc.invert(ok))) if include_failed else array("q")
    return ResumeIndex(keys(latest.filter(ok)), rows_ok, latest.num_rows - rows_ok, failed)


def _hashes(rows: pa.Table) -> array[int]:
    """The resume keys of ``rows`` (key as "id", fingerprint), hashed."""
    pc = compute()
    joined = pc.binary_join_element_wise(rows["id"], pc.fill_null(rows["request_fingerprint"], ""), _KEY_SEP)
    return array("q", map(hash, joined.to_pylist()))


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
