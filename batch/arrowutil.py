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

__all__ = ["hashes_repeat", "is_text", "read_parquet_columns"]

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
