"""Rows out of a JSONL file, read line by line with orjson.

Ids: ``Row.id`` is ``str()`` of the id value; without an id column it is the
0-based row index as a string, counting rows, not lines: blank lines are
skipped and do not count. ``Row.line`` is the 1-based line. The pass-through
columns' Arrow types are inferred from the first rows (a column null in all of
them is taken as string); a later value that does not fit is a bad row.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, BinaryIO

import orjson
import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

from batch.arrowutil import hashes_repeat
from batch.records import Row
from batch.sources import ids
from batch.sources.base import FileSource, RowProblem, check_messages

__all__ = ["JsonlSource"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_BOM = b"\xef\xbb\xbf"
_CHUNK = 65_536  # ids gathered into one Arrow array at a time; rows a batch when checking
_SAMPLE = 1024  # rows the pass-through types are inferred from
_ARROW_MISFIT = (pa.ArrowException, ValueError, TypeError, OverflowError)


class JsonlSource(FileSource):
    """A JSON Lines file: one JSON object a line; ``num_rows`` is None (unknown until read)."""

    format = "jsonl"
    suffixes = frozenset({".jsonl", ".ndjson", ".jsonlines", ".json"})

    def _open(self) -> None:
        first: tuple[int, dict[str, Any]] | None = None
        sample: list[tuple[int, dict[str, Any]]] = []
        with self.path.open("rb") as f:
            for lineno, obj in self._objects(f):
                if obj is None:
                    continue
                if first is None:
                    first = (lineno, obj)
                sample.append((lineno, obj))
                if len(sample) >= _SAMPLE:
                    break
        if first is None:
            raise self._error("the input has no rows" if not self.fail_rows else "no line holds a JSON object")
        self._check_columns(list(first[1]), first[0])
        fields = []
        for name in self.spec.passthrough:
            values = [obj.get(name) for _, obj in sample]
            try:
                t = pa.array(values).type
            except _ARROW_MISFIT:
                line = _first_misfit([(ln, obj.get(name)) for ln, obj in sample])
                raise self._error("values of mixed types in a pass-through column", line, name) from None
            fields.append(pa.field(name, pa.string() if pa.types.is_null(t) else t))
        self.passthrough_schema = pa.schema(fields)

    def _objects(self, f: BinaryIO) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(line, object) per non-blank line; a bad line raises, or gives None in fail_row mode."""
        for lineno, obj, problem in _parsed_lines(f):
            if problem is not None:
                if not self.fail_rows:
                    raise self._error(problem, lineno)
                yield lineno, None
            else:
                yield lineno, obj

    # --- checks ------------------------------------------------------------------

    def check(self) -> None:
        """Everything :meth:`check_ids` and :meth:`check_rows` check, reading the file once."""
        if self.fail_rows or self.id_column is None:
            super().check()
            return
        # building every row checks each line; their ids' hashes come with it
        hashes: array[int] = array("q")
        for batch in self.batches(_CHUNK):
            hashes.extend([hash(row.id) for row in batch])
        if hashes_repeat(hashes):
            self._name_duplicates(self.id_column)

    def check_ids(self) -> None:
        """Raise InputError if an id is bad or two rows share one, naming the first few.

        A first pass keeps each id's hash (8 bytes); only when two match is the
        file read again, the ids gathered into Arrow arrays chunk by chunk, to
        name the duplicates. In abort mode a bad line is reported here too.
        """
        if self.id_column is None:
            return
        if hashes_repeat(array("q", (hash(value) for _, value in self._ids(self.id_column)))):
            self._name_duplicates(self.id_column)

    def check_rows(self) -> None:
        if self.fail_rows:
            return
        for _ in self.batches(_CHUNK):
            pass

    def _ids(self, column: str) -> Iterator[tuple[int, str]]:
        """(line, id as text) of every row that has a good one; a bad one raises in abort mode."""
        with self.path.open("rb") as f:
            for lineno, obj in self._objects(f):
                if obj is None:
                    continue
                try:
                    yield lineno, ids.json_id(obj.get(column), column)
                except RowProblem as problem:
                    if not self.fail_rows:
                        raise self._error(problem.message, lineno, column) from None

    def _name_duplicates(self, column: str) -> None:
        chunks: list[pa.Array] = []
        line_chunks: list[pa.Array] = []
        values: list[str] = []
        lines: list[int] = []
        for lineno, value in self._ids(column):
            values.append(value)
            lines.append(lineno)
            if len(values) >= _CHUNK:
                chunks.append(pa.array(values, pa.string()))
                line_chunks.append(pa.array(lines, pa.int64()))
                values, lines = [], []
        if values:
            chunks.append(pa.array(values, pa.string()))
            line_chunks.append(pa.array(lines, pa.int64()))
        if not chunks:
            return
        all_ids = pa.chunked_array(chunks).combine_chunks()
        all_lines = pa.chunked_array(line_chunks).combine_chunks()
        found = ids.duplicates(all_ids, all_lines, "line")
        if found is not None:
            raise self._error(found[0], found[1], column)

    # --- rows ----------------------------------------------------------------------

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        return self._batches(batch_size)

    def _batches(self, batch_size: int) -> Iterator[list[Row]]:
        with self.path.open("rb") as f:
            yield from self.rows_of(f, batch_size)

    def rows_of(self, lines: Iterable[bytes], batch_size: int) -> Iterator[list[Row]]:
        """The rows of ``lines`` of this input, in batches (also a Ray worker's block of lines)."""
        # the row loop of a large input: attributes read once, into locals
        id_column = self.id_column
        prompt_column = self.spec.prompt_column
        messages_column = self.spec.messages_column or ""
        template_columns = self.template_columns
        value_columns = self.value_columns
        mode = self.mode
        rows: list[Row] = []
        for index, (lineno, obj, bad_line) in enumerate(_parsed_lines(lines)):
            row_id: str | None = None
            values: Mapping[str, Any] | None = None
            try:
                if bad_line is not None:
                    raise RowProblem(bad_line, None)
                values = {c: obj.get(c) for c in value_columns} if value_columns else _EMPTY
                if id_column is None:
                    row_id = str(index)
                else:
                    value = obj.get(id_column)
                    row_id = value if type(value) is str else ids.json_id(value, id_column)
                prompt: str | None = None
                msgs: list[dict[str, Any]] | None = None
                if mode == "prompt":
                    prompt = obj.get(prompt_column)
                    if type(prompt) is not str:
                        raise _bad_prompt(obj, prompt_column)
                elif mode == "messages":
                    msgs = _messages(obj.get(messages_column), messages_column)
                else:
                    for name in template_columns:
                        if obj.get(name) is None:
                            raise RowProblem("missing or null value used by prompt_template", name)
            except RowProblem as problem:
                rows.append(self._problem(problem, index, lineno, row_id, values))
            else:
                rows.append(Row(index, lineno, row_id, prompt, msgs, values))
            if len(rows) >= batch_size:
                yield self._fit_passthrough(rows)
                rows = []
        if rows:
            yield self._fit_passthrough(rows)

    def _fit_passthrough(self, rows: list[Row]) -> list[Row]:
        """Check pass-through values convert to the inferred types."""
        for field in self.passthrough_schema:
            name = field.name
            try:
                pa.array([row.values.get(name) for row in rows], type=field.type)
                continue
            except _ARROW_MISFIT:
                pass
            for i, row in enumerate(rows):
                try:
                    pa.array([row.values.get(name)], type=field.type)
                except _ARROW_MISFIT:
                    problem = RowProblem(f"value does not fit the type {field.type} inferred from the first rows", name)
                    fixed = dict(row.values)
                    fixed[name] = None
                    rows[i] = self._problem(problem, row.index, row.line, row.id, fixed)
        return rows


def _parsed_lines(f: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """(line, object, None) per non-blank line, or (line, {}, why) for a line that is not a JSON object."""
    empty: dict[str, Any] = {}
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    for lineno, raw in enumerate(f, 1):
        if raw.isspace():
            continue
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            obj = loads(raw)
        except decode_error as exc:
            yield lineno, empty, f"not valid JSON ({exc})"
            continue
        if type(obj) is not dict:
            yield lineno, empty, f"not a JSON object but {type(obj).__name__}"
            continue
        yield lineno, obj, None


def _bad_prompt(obj: dict[str, Any], column: str) -> RowProblem:
    value = obj.get(column)
    return RowProblem(
        "missing prompt" if column not in obj
        else "null prompt" if value is None
        else f"the prompt must be a string, not {type(value).__name__}",
        column,
    )


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    try:
        return check_messages(value)
    except ValueError as exc:
        raise RowProblem(str(exc), column) from None


def _first_misfit(values: list[tuple[int, Any]]) -> int | None:
    """The line of the first value that does not convert alongside the ones before it."""
    seen: list[Any] = []
    for line, value in values:
        seen.append(value)
        try:
            pa.array(seen)
        except _ARROW_MISFIT:
            return line
    return None
