"""What earlier runs of an output cost and used: for a budget (money already spent) and a plan
(calibrating its estimates on real usage).

Reads a few columns of the output and its parts, never the answers' text. Every row on
disk counts, superseded ones too: money spent on a row that was later redone was spent.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import OutputError
from batch.store.parts import _is_part_ipc, _read_ipc, sources

__all__ = ["HISTORY_COLUMNS", "earlier_rows", "empty_history"]

#: the columns read (``variant`` is filled from ``model`` for an output written before sweeps)
HISTORY_COLUMNS = ("id", "request_fingerprint", "status", "model", "variant", "params",
                   "prompt_tokens", "completion_tokens", "cost_usd", "latency_s")

_TYPES = {"prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
          "cost_usd": pa.float64(), "latency_s": pa.float64()}


def _read(path: Path) -> pa.Table:
    try:
        if _is_part_ipc(path):
            table = _read_ipc(path)
        else:
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            table = pf.read(columns=[c for c in HISTORY_COLUMNS if c in names])
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read earlier progress ({exc}); rerun with --fresh to start over", path=path) from None
    n = table.num_rows
    columns = {}
    for name in HISTORY_COLUMNS:
        if name in table.column_names:
            columns[name] = table[name]
        elif name == "variant" and "model" in table.column_names:
            columns[name] = table["model"]
        else:
            columns[name] = pa.nulls(n, _TYPES.get(name, pa.string()))
    return pa.table(columns)


def earlier_rows(output: Path) -> pa.Table:
    """The :data:`HISTORY_COLUMNS` of every row of ``output`` and its parts (empty when there are none)."""
    tables = [_read(path) for path in sources(output)]
    if not tables:
        return empty_history()
    return pa.concat_tables(tables, promote_options="permissive").combine_chunks()


def empty_history() -> pa.Table:
    """No earlier rows (a fresh start)."""
    return pa.table({name: pa.array([], _TYPES.get(name, pa.string())) for name in HISTORY_COLUMNS})
