"""The final assembly: the previous output and every part merged into one Parquet file, atomically.

For each id only its newest row is kept; memory stays bounded by one batch of
one source plus the id column of all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from batch.arrowutil import hashes_repeat, nulls_of
from batch.errors import DiskError, OutputError
from batch.store.atomic import atomic_write
from batch.store.checks import output_target
from batch.store.parts import PART_RE, part_files, source_batches, sources
from batch.store.resume import PLAIN_KEY, id_hashes, latest_rows, winners

__all__ = ["assemble"]

# rows of a row group of the assembled output: the writer holds one encoded group
# in memory (about 6 MB at 8k rows of ~700-byte answers)
_ROW_GROUP_ROWS = 8_192
# columns whose values are all or nearly all different: a dictionary page there
# is built, found useless and thrown away for every row group
_NO_DICTIONARY = frozenset({"id", "text", "response_id", "request_fingerprint", "latency_s", "ttft_s", "created",
                            "finished_at"})


def _itersource_batches(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for batch in source_batches(path):
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
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                if f.metadata and f.metadata.get(b"promptmill") == b"parsed":
                    # the schema changed since: those rows' fingerprints changed too, so they are redone
                    arrays.append(nulls_of(table.num_rows, f.type))
                    continue
                raise OutputError(
                    f"column '{f.name}' of earlier progress has type {col.type}, now {f.type}; rerun with --fresh",
                    path=path,
                ) from None
        else:
            arrays.append(nulls_of(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def assemble(output: Path, schema: pa.Schema, key: tuple[str, ...] = PLAIN_KEY) -> int:
    """Merge the previous output and every part into ``output``, atomically. Returns the row count.

    Memory stays bounded by one batch of one source plus the id column of all
    of them; the parts are removed once the new output is in place.
    """
    found = sources(output)
    # Usually no id repeats (a first run, or a rerun that redid nothing): 8 bytes
    # an id prove it. Only otherwise are the ids themselves grouped to find each
    # one's newest row.
    mask = None
    runs = {m.group(1) for p in found if (m := PART_RE.match(p.name))}
    if output in found or len(runs) > 1:
        # ids are unique within one run (the input's are checked, each row is done
        # once); only an earlier run's rows can repeat one
        hashes, offsets = id_hashes(found, key)
        if hashes_repeat(hashes):
            mask = winners(latest_rows(found, key)[0])
        del hashes
        pa.default_memory_pool().release_unused()
    else:
        offsets = [0] * (len(found) + 1)  # row positions matter only with a mask
    target = output_target(output)
    try:
        total = atomic_write(target, lambda fh: _merge(found, offsets, mask, schema, fh))
    except OSError as exc:
        raise DiskError(exc, path=target, what="the output") from None
    for p in part_files(output):
        p.unlink(missing_ok=True)
    return total


def _merge(found: list[Path], offsets: list[int], mask: pa.Array | None, schema: pa.Schema, fh: BinaryIO) -> int:
    """Write every source's rows (those ``mask`` keeps) to ``fh`` as one Parquet file."""
    total = 0
    dictionary = [name for name in schema.names if name not in _NO_DICTIONARY]
    writer = pq.ParquetWriter(fh, schema, compression="zstd", use_dictionary=dictionary)
    # Parts are small; written one by one they would make thousands of tiny row
    # groups, whose metadata the writer holds until it closes. Gather them instead.
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        for i, path in enumerate(found):
            start = offsets[i]
            for batch in _itersource_batches(path, schema):
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
    return total
