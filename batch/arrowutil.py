"""Arrow helpers shared by the input sources and the output store.

A leaf: it imports no stage, so the writer can use it without importing the
reader's sources.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

from batch._startup import compute

__all__ = ["array_of", "hashes_repeat", "is_text", "nulls_of", "read_parquet_columns"]

# up to this many values, plain Python does what pyarrow.compute would, and a
# small job never loads pyarrow.compute (see batch._startup.compute)
_FEW_FOR_PYTHON = 65_536


def read_parquet_columns(path: Path | str, columns: list[str]) -> pa.Table:
    """``columns`` of a Parquet file, without the dataset layer ``pq.read_table`` imports (slow to load).

    Raises ``pa.ArrowInvalid`` naming a missing column (``ParquetFile.read`` would skip it silently).
    """
    pf = pq.ParquetFile(path)
    try:
        names = set(pf.schema_arrow.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise pa.ArrowInvalid(f"no column {missing[0]!r}")
        return pf.read(columns=columns)
    finally:
        pf.close()


def hashes_repeat(hashes: array[int]) -> bool:
    """Whether two of these hashes are equal (a set when few, else sorted by Arrow: 16 bytes a hash at most)."""
    if len(hashes) < _FEW_FOR_PYTHON:
        return len(set(hashes)) != len(hashes)
    pc = compute()

    values = pa.Array.from_buffers(pa.int64(), len(hashes), [None, pa.py_buffer(hashes)])
    ordered = pc.take(values, pc.array_sort_indices(values))
    return bool(pc.any(pc.equal(ordered[1:], ordered[:-1])).as_py())


def is_text(t: pa.DataType) -> bool:
    """Whether an Arrow type holds strings (plain, large or view)."""
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _without_dictionaries(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_without_dictionaries(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_without_dictionaries(t.value_type)))
    return t


def array_of(values: list[object], t: pa.DataType) -> pa.Array:
    """``pa.array(values, t)``, also where ``t`` nests dictionaries: built from Python, a dictionary
    inside a null struct gets an index into an empty dictionary (invalid), so those are built as
    their values' type and cast (which encodes them properly)."""
    plain = _without_dictionaries(t)
    if plain == t:
        return pa.array(values, t)
    return pa.array(values, plain).cast(t)


def nulls_of(count: int, t: pa.DataType) -> pa.Array:
    """``pa.nulls(count, t)``, also where ``t`` nests dictionaries (see :func:`array_of`)."""
    plain = _without_dictionaries(t)
    return pa.nulls(count, t) if plain == t else pa.nulls(count, plain).cast(t)
