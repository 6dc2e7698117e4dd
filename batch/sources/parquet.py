"""Rows out of a Parquet file, read in record batches holding only the columns the job uses.

Ids: ``Row.id`` is ``str()`` of the id column's value; without an id column it
is the 0-based row index. ``Row.line`` is the 1-based row number.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

from batch.arrowutil import hashes_repeat, is_text, read_parquet_columns
from batch.records import Row
from batch.sources import ids
from batch.sources.base import FileSource, RowProblem, check_messages

__all__ = ["ParquetSource", "arrow_rows"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class ParquetSource(FileSource):
    """A Parquet file; ``num_rows`` comes from its footer."""

    format = "parquet"
    suffixes = frozenset({".parquet", ".pq", ".parq"})
    magic = b"PAR1"

    _pf: pq.ParquetFile

    def _open(self) -> None:
        try:
            pf = pq.ParquetFile(self.path)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._error(f"not a Parquet file, or truncated ({exc})") from None
        self._pf = pf
        self.num_rows = pf.metadata.num_rows
        if self.num_rows == 0:
            raise self._error("the input has no rows")
        self._check_columns(list(schema.names))
        spec = self.spec
        if self.id_column is not None:
            try:
                ids.check_arrow_type(schema.field(self.id_column).type, self.id_column)
            except RowProblem as problem:
                raise self._error(problem.message, 1, problem.column) from None
        if self.mode == "prompt" and not is_text(schema.field(spec.prompt_column).type):
            raise self._error(
                f"the prompt column must hold strings, not {schema.field(spec.prompt_column).type}",
                None,
                spec.prompt_column,
            )
        if self.mode == "messages":
            assert spec.messages_column is not None
            t = schema.field(spec.messages_column).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
                raise self._error(
                    f"the messages column must hold lists of {{role, content}} structs, not {t}",
                    None,
                    spec.messages_column,
                )
        self.passthrough_schema = pa.schema([schema.field(name) for name in spec.passthrough])

    # --- ids -------------------------------------------------------------------

    def check_ids(self) -> None:
        """Raise InputError at a null id or when two rows share an id, naming the first few.

        A first pass keeps 8 bytes an id (its hash), so a million-row input costs
        8 MB here; only when two hashes match is the id column read again, whole,
        to confirm and name the duplicates.
        """
        column = self.id_column
        if column is None or not hashes_repeat(self._id_hashes(column)):
            return
        try:
            column_ids = read_parquet_columns(self.path, [column]).column(0).combine_chunks()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._error(f"cannot read the id column ({exc})", None, column) from None
        found = ids.duplicates(ids.text_array(column_ids), None, "row")
        if found is not None:
            raise self._error(found[0], found[1], column)

    def _id_hashes(self, column: str) -> array[int]:
        # sized once (a growing array is copied as it grows); small chunks keep the
        # short-lived id strings few, so the heap they used is reused, not grown
        hashes: array[int] = array("q", [0]) * self._pf.metadata.num_rows
        offset = kept = 0
        try:
            for rb in self._pf.iter_batches(batch_size=8192, columns=[column], use_threads=False):
                column_ids = rb.column(0)
                if column_ids.null_count:
                    first = ids.first_null(column_ids)
                    if not self.fail_rows and first is not None:
                        raise self._error(ids.NULL_ID, offset + first + 1, column)
                    column_ids = column_ids.drop_null()
                offset += rb.num_rows
                values = ids.texts(column_ids)
                hashes[kept : kept + len(values)] = array("q", map(hash, values))
                kept += len(values)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._error(f"cannot read the id column ({exc})", None, column) from None
        del hashes[kept:]
        return hashes

    # --- rows ------------------------------------------------------------------

    def check_rows(self) -> None:
        if self.fail_rows:
            return
        if self.mode != "messages":
            # the only row problems here are nulls: Arrow counts them without building rows
            self._check_nulls()
            return
        for _ in self.batches(65_536):
            pass

    def _check_nulls(self) -> None:
        columns = [c for c in (self.id_column, self.spec.prompt_column if self.mode == "prompt" else None) if c]
        columns += list(self.template_columns)
        columns = [c for c in columns if self._may_hold_nulls(c)]
        if not columns:
            return
        offset = 0
        try:
            for rb in self._pf.iter_batches(batch_size=65536, columns=columns, use_threads=False):
                for name, arr in zip(rb.schema.names, rb.columns, strict=True):
                    first = ids.first_null(arr)
                    if first is not None:
                        what = (ids.NULL_ID if name == self.id_column else "null prompt" if self.mode == "prompt"
                                else "null value used by prompt_template")
                        raise self._error(what, offset + first + 1, name)
                offset += rb.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"cannot read row {offset + 1} onwards: the Parquet file is damaged ({exc})") from None

    def _may_hold_nulls(self, column: str) -> bool:
        """False when every row group's statistics say the column has no nulls (then it need not be read)."""
        meta = self._pf.metadata
        where = [i for i in range(meta.num_columns) if meta.schema.column(i).path == column]
        if len(where) != 1:  # a nested column: the statistics are per leaf
            return True
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(where[0]).statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                return True
        return False

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        return self._batches(batch_size)

    def _batches(self, batch_size: int) -> Iterator[list[Row]]:
        index = 0
        try:
            # one thread: reading ahead on every core costs memory and buys nothing here
            batches = self._pf.iter_batches(batch_size=batch_size, columns=self._needed(), use_threads=False)
            for rb in batches:
                rows = arrow_rows(self, rb, index)
                index += len(rows)
                yield rows
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"cannot read row {index + 1} onwards: the Parquet file is damaged ({exc})") from None


def arrow_rows(source: FileSource, rb: pa.RecordBatch | pa.Table, index: int) -> list[Row]:
    """The rows of one Arrow batch of ``source``'s input columns (``index``: the position of its first row).

    Also what the Ray engine's workers make of a block Ray Data read (batch.engines.ray_worker).
    """
    spec = source.spec
    value_columns = source.value_columns
    mode = source.mode
    cols = dict(zip(rb.schema.names, rb.columns, strict=True))
    bad: dict[int, RowProblem] = {}
    row_ids: list[Any] | None = None  # str where the row has an id
    if source.id_column is not None:
        _mark(bad, ids.null_rows(cols[source.id_column]), RowProblem(ids.NULL_ID, source.id_column))
        row_ids = ids.texts(cols[source.id_column])
    prompts: list[Any] | None = None
    messages: list[Any] | None = None
    if mode == "prompt":
        arr = cols[spec.prompt_column]
        _mark(bad, ids.null_rows(arr), RowProblem("null prompt", spec.prompt_column))
        prompts = arr.to_pylist()
    elif mode == "messages":
        assert spec.messages_column is not None
        messages = cols[spec.messages_column].to_pylist()
    for name in source.template_columns:
        _mark(bad, ids.null_rows(cols[name]), RowProblem("null value used by prompt_template", name))
    value_rows = list(zip(*(cols[c].to_pylist() for c in value_columns), strict=True)) if value_columns else None
    rows: list[Row] = []
    append = rows.append
    for i in range(rb.num_rows):
        row_id = row_ids[i] if row_ids is not None else str(index)
        values = dict(zip(value_columns, value_rows[i], strict=True)) if value_rows is not None else _EMPTY
        problem = bad.get(i) if bad else None
        msgs = None
        if messages is not None and problem is None:
            try:
                msgs = check_messages(messages[i])
            except ValueError as exc:
                problem = RowProblem(str(exc), spec.messages_column)
        if problem is not None:
            append(source._problem(problem, index, index + 1, row_id, values))
        else:
            append(Row(index, index + 1, row_id, prompts[i] if prompts is not None else None, msgs, values))
        index += 1
    return rows


def _mark(bad: dict[int, RowProblem], positions: list[int], problem: RowProblem) -> None:
    """Note ``problem`` at each position that has none yet."""
    for i in positions:
        bad.setdefault(i, problem)

