"""Helpers for the source tests: write an input, read every row, catch the one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import InputError
from batch.records import Row
from batch.sources import Source, open_source
from batch.spec import InputSpec


def spec(path: Path, **fields: Any) -> InputSpec:
    return InputSpec(path=path, **fields)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def write_parquet(path: Path, columns: dict[str, Any], **kwargs: Any) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def all_rows(source: Source, batch_size: int = 1024) -> list[Row]:
    return [row for batch in source.batches(batch_size) for row in batch]


def input_error(input_spec: InputSpec, *, rows: bool = False, ids: bool = False) -> InputError:
    with pytest.raises(InputError) as info:
        source = open_source(input_spec)
        if ids:
            source.check_ids()
        if rows:
            all_rows(source)
    return info.value
