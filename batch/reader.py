"""Stream rows from a Parquet or JSONL input without loading the whole file.

Parquet is read in record batches (``ParquetFile.iter_batches``) holding only
the columns the job uses; JSONL line by line with orjson. Everything that can
be checked before the first request is checked in :class:`InputReader`'s
constructor (the file, its format, its columns); rows are checked as they are
read.

Ids: ``Row.id`` is ``str()`` of the id column's value. When the job leaves
``id_column`` at its default and the input has no such column, the id is the
0-based row index as a string (``"0"``, ``"1"``, ...), counting rows, not
lines: blank JSONL lines are skipped and do not count.

A row that cannot be used (a JSONL line that is not a JSON object, a null or
non-string prompt, malformed messages, a missing id) stops the job with an
:class:`~batch.errors.InputError` naming the file, line (or row) and column. With
``on_bad_line = "fail_row"`` it becomes an *error row* instead: ``prompt`` and
``messages`` are ``None`` and ``values[ERROR_KEY]`` holds the message (see
:func:`row_error`); its id is the row's id when it could be read, else
``"<line N>"``. The runner writes it as a failed result without sending it.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import orjson
import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

from batch._startup import compute
from batch.errors import InputError
from batch.records import Row
from batch.spec import InputSpec

__all__ = ["ERROR_KEY", "InputReader", "hashes_repeat", "row_error"]

logger = logging.getLogger(__name__)

ERROR_KEY = "__error__"

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_PARQUET_SUFFIXES = frozenset({".parquet", ".pq", ".parq"})
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".jsonlines", ".json"})
_BOM = b"\xef\xbb\xbf"
_ID_CHUNK = 65_536
# up to this many values, plain Python does what pyarrow.compute would, and a
# small job never loads pyarrow.compute (see batch._startup.compute)
_FEW_FOR_PYTHON = 65_536
_FEW = 5


def _bad_id(value: Any) -> str | None:
    """Why a JSON id value cannot be an id (a boolean, list or object), else ``None``."""
    if isinstance(value, bool | list | dict):
        shown = orjson.dumps(value).decode()
        shown = shown if len(shown) <= 40 else shown[:39] + "…"
        return f"an id must be a string or a number, not {type(value).__name__} {shown}"
    return None


def row_error(row: Row) -> str | None:
    """The message of an error row (``on_bad_line = "fail_row"``), else ``None``."""
    if row.prompt is None and row.messages is None:
        error = row.values.get(ERROR_KEY)
        return error if isinstance(error, str) else None
    return None


class _RowProblem(Exception):
    """A row-level problem; becomes an InputError or an error row."""

    def __init__(self, message: str, column: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


def _check_messages(value: Any) -> list[dict[str, Any]]:
    """Validate a messages cell: a non-empty list of {role: str, content: str | list}.

    Keys whose value is null are dropped (Parquet structs fill absent fields with null).
    """
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object with role and content")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} has no string 'role'")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise ValueError(f"message {i} has no 'content' (a string or a list of parts)")
        if None in message.values():
            message = {k: v for k, v in message.items() if v is not None}
        out.append(message)
    return out


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


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _describe_ids(first: list[tuple[str, list[int]]], total: int, unit: str) -> str:
    shown = ", ".join(f"'{value}' ({unit}s {', '.join(map(str, where))})" for value, where in first)
    more = f" and {total - len(first)} more" if total > len(first) else ""
    return f"duplicate ids: {shown}{more}; every id must be unique"


class InputReader:
    """Opens and checks an input up front, then yields its rows in batches.

    ``passthrough_schema`` gives the Arrow types of the pass-through columns (for
    the writer): from the Parquet schema, or inferred from the first rows of a
    JSONL file (a column null in all of them is taken as string). ``num_rows`` is
    the row count of a Parquet file, ``None`` for JSONL.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self.fail_rows = spec.on_bad_line == "fail_row"
        if spec.messages_column is not None:
            self.mode = "messages"
        elif spec.prompt_template is not None:
            self.mode = "template"
        else:
            self.mode = "prompt"
        self.template_columns = spec.template_columns
        self.value_columns: tuple[str, ...] = tuple(dict.fromkeys((*self.template_columns, *spec.passthrough)))
        self.num_rows: int | None = None
        self._check_file()
        self.format = self._detect_format()
        self._pf: pq.ParquetFile | None = None
        if self.format == "parquet":
            self._open_parquet()
        else:
            self._open_jsonl()

    # --- opening -------------------------------------------------------------

    def _error(self, message: str, line: int | None = None, column: str | None = None) -> InputError:
        return InputError(message, path=self.path, line=line, column=column)

    def _check_file(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise self._error("input file not found") from None
        except OSError as exc:
            raise self._error(f"cannot read the input: {exc.strerror or exc}") from None
        if self.path.is_dir():
            raise self._error("is a directory, not an input file")
        if size == 0:
            raise self._error("the input file is empty")

    def _detect_format(self) -> str:
        if self.spec.format != "auto":
            return self.spec.format
        suffix = self.path.suffix.lower()
        if suffix in _PARQUET_SUFFIXES:
            return "parquet"
        if suffix in _JSONL_SUFFIXES:
            return "jsonl"
        with self.path.open("rb") as f:
            return "parquet" if f.read(4) == b"PAR1" else "jsonl"

    def _missing(self, columns: list[str], line: int | None = None) -> InputError:
        shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
        have = f"; the input has: {shown}" if columns else ""
        spec = self.spec
        if self.mode == "messages":
            return self._error(f"no messages column{have}", line, spec.messages_column)
        if self.mode == "prompt":
            return self._error(
                f"no prompt column (set input.prompt_column, messages_column or prompt_template){have}",
                line,
                spec.prompt_column,
            )
        raise AssertionError(self.mode)

    def _check_columns(self, columns: list[str], line: int | None = None) -> None:
        spec = self.spec
        present = set(columns)
        if self.mode == "messages" and spec.messages_column not in present:
            raise self._missing(columns, line)
        if self.mode == "prompt" and spec.prompt_column not in present:
            raise self._missing(columns, line)
        for name in self.template_columns:
            if name not in present:
                raise self._error(f"prompt_template uses {{{name}}} but the input has no such column", line, name)
        for name in spec.passthrough:
            if name not in present:
                raise self._error("pass-through column missing from the input", line, name)
        if spec.id_name in present:
            self.id_column: str | None = spec.id_name
        elif spec.id_column is not None:
            raise self._error("id column missing from the input", line, spec.id_column)
        else:
            self.id_column = None

    def _needed(self) -> list[str]:
        spec = self.spec
        names: list[str] = []
        if self.id_column is not None:
            names.append(self.id_column)
        if self.mode == "prompt":
            names.append(spec.prompt_column)
        elif self.mode == "messages":
            assert spec.messages_column is not None
            names.append(spec.messages_column)
        names.extend(self.value_columns)
        return list(dict.fromkeys(names))

    def _open_parquet(self) -> None:
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
            t = schema.field(self.id_column).type
            if pa.types.is_boolean(t) or pa.types.is_nested(t):
                raise self._error(f"an id must be a string or a number, not {t}", 1, self.id_column)
        if self.mode == "prompt" and not _is_text(schema.field(spec.prompt_column).type):
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

    def _open_jsonl(self) -> None:
        first: tuple[int, dict[str, Any]] | None = None
        sample: list[tuple[int, dict[str, Any]]] = []
        with self.path.open("rb") as f:
            for lineno, obj in self._objects(f):
                if obj is None:
                    continue
                if first is None:
                    first = (lineno, obj)
                sample.append((lineno, obj))
                if len(sample) >= 1024:
                    break
        if first is None:
            raise self._error("the input has no rows" if not self.fail_rows else "no line holds a JSON object")
        self._check_columns(list(first[1]), first[0])
        fields = []
        for name in self.spec.passthrough:
            values = [obj.get(name) for _, obj in sample]
            try:
                t = pa.array(values).type
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                line = self._first_misfit([(ln, obj.get(name)) for ln, obj in sample], None)
                raise self._error("values of mixed types in a pass-through column", line, name) from None
            fields.append(pa.field(name, pa.string() if pa.types.is_null(t) else t))
        self.passthrough_schema = pa.schema(fields)

    @staticmethod
    def _first_misfit(values: list[tuple[int, Any]], t: pa.DataType | None) -> int | None:
        """The line of the first value that does not convert (to ``t``, or alongside the ones before)."""
        seen: list[Any] = []
        for line, value in values:
            seen.append(value)
            try:
                pa.array(seen, type=t) if t is None else pa.array([value], type=t)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                return line
        return None

    def _objects(self, f: BinaryIO) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(line, object) per non-blank line; a bad line raises, or gives None in fail_row mode."""
        for lineno, obj, problem in self._parsed_lines(f):
            if problem is not None:
                if not self.fail_rows:
                    raise self._error(problem, lineno)
                yield lineno, None
            else:
                yield lineno, obj

    @staticmethod
    def _parsed_lines(f: BinaryIO) -> Iterator[tuple[int, dict[str, Any], str | None]]:
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

    # --- ids -------------------------------------------------------------------

    def check(self) -> None:
        """Everything :meth:`check_ids` and :meth:`check_rows` check, reading a JSONL file once."""
        if self.format == "jsonl" and not self.fail_rows and self.id_column is not None:
            # building every row checks each line; their ids' hashes come with it
            hashes: array[int] = array("q")
            for batch in self.batches(_ID_CHUNK):
                hashes.extend([hash(row.id) for row in batch])
            if hashes_repeat(hashes):
                self._check_jsonl_ids(self.id_column)
            return
        self.check_ids()
        self.check_rows()

    def check_ids(self) -> None:
        """Raise InputError if two rows share an id, naming the first few.

        Reads only the id column (Parquet) or collects ids into Arrow arrays
        chunk by chunk (JSONL), so memory stays compact. Does nothing when row
        numbers are the ids. In abort mode a bad JSONL line is reported here too.
        """
        if self.id_column is None:
            return
        # A first pass keeps 8 bytes an id (its hash), so a million-row input
        # costs 8 MB here; only when two hashes match is the input read again,
        # exactly, to confirm and name the duplicates.
        if self.format == "parquet":
            if hashes_repeat(self._parquet_id_hashes(self.id_column)):
                self._check_parquet_ids(self.id_column)
        elif hashes_repeat(self._jsonl_id_hashes(self.id_column)):
            self._check_jsonl_ids(self.id_column)

    def _parquet_id_hashes(self, column: str) -> array[int]:
        assert self._pf is not None
        # sized once (a growing array is copied as it grows); small chunks keep the
        # short-lived id strings few, so the heap they used is reused, not grown
        hashes: array[int] = array("q", [0]) * self._pf.metadata.num_rows
        offset = kept = 0
        try:
            for rb in self._pf.iter_batches(batch_size=8192, columns=[column], use_threads=False):
                ids = rb.column(0)
                if ids.null_count:
                    if not self.fail_rows:
                        pc = compute()

                        first = pc.index(pc.is_null(ids), True).as_py()
                        raise self._error("null id", offset + first + 1, column)
                    ids = ids.drop_null()
                offset += rb.num_rows
                values = ids.to_pylist()
                hashes[kept : kept + len(values)] = array(
                    "q", map(hash, values) if _is_text(ids.type) else (hash(str(v)) for v in values)
                )
                kept += len(values)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._error(f"cannot read the id column ({exc})", None, column) from None
        del hashes[kept:]
        return hashes

    def _jsonl_ids(self, column: str) -> Iterator[tuple[int, str]]:
        """(line, id as text) of every JSONL row that has one."""
        with self.path.open("rb") as f:
            for lineno, obj in self._objects(f):
                if obj is None:
                    continue
                value = obj.get(column)
                if value is None:
                    if self.fail_rows:
                        continue
                    raise self._error("missing or null id", lineno, column)
                if type(value) is not str and (bad := _bad_id(value)) is not None:
                    if self.fail_rows:
                        continue
                    raise self._error(bad, lineno, column)
                yield lineno, value if type(value) is str else str(value)

    def _jsonl_id_hashes(self, column: str) -> array[int]:
        return array("q", (hash(value) for _, value in self._jsonl_ids(column)))

    def _check_parquet_ids(self, column: str) -> None:
        pc = compute()

        try:
            ids = read_parquet_columns(self.path, [column]).column(0).combine_chunks()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._error(f"cannot read the id column ({exc})", None, column) from None
        if ids.null_count and not self.fail_rows:
            first = pc.index(pc.is_null(ids), True).as_py()
            raise self._error("null id", first + 1, column)
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            ids = pc.cast(ids, pa.string()) if not pa.types.is_floating(ids.type) else pa.array(
                [None if v is None else str(v) for v in ids.to_pylist()], pa.string()
            )
        self._report_duplicates(ids, None, column, "row")

    def _check_jsonl_ids(self, column: str) -> None:
        chunks: list[pa.Array] = []
        line_chunks: list[pa.Array] = []
        ids: list[str] = []
        lines: list[int] = []
        for lineno, value in self._jsonl_ids(column):
            ids.append(value)
            lines.append(lineno)
            if len(ids) >= _ID_CHUNK:
                chunks.append(pa.array(ids, pa.string()))
                line_chunks.append(pa.array(lines, pa.int64()))
                ids, lines = [], []
        if ids:
            chunks.append(pa.array(ids, pa.string()))
            line_chunks.append(pa.array(lines, pa.int64()))
        if not chunks:
            return
        all_ids = pa.chunked_array(chunks).combine_chunks()
        all_lines = pa.chunked_array(line_chunks).combine_chunks()
        self._report_duplicates(all_ids, all_lines, column, "line")

    def _report_duplicates(self, ids: pa.Array, lines: pa.Array | None, column: str, unit: str) -> None:
        pc = compute()

        counts = pc.value_counts(ids.drop_null())
        dups = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(dups) == 0:
            return
        # The first few duplicates in file order, each with where it occurs.
        positions = pc.indices_nonzero(pc.is_in(ids, value_set=dups))
        found: dict[str, list[int]] = {}
        for pos in positions.to_pylist():
            value = ids[pos].as_py()
            where = lines[pos].as_py() if lines is not None else pos + 1
            if value in found:
                found[value].append(where)
            elif len(found) < _FEW:
                found[value] = [where]
            if len(found) >= _FEW and all(len(v) >= 2 for v in found.values()):
                break
        first = [(value, where[:3]) for value, where in found.items()]
        raise self._error(_describe_ids(first, len(dups), unit), first[0][1][1], column)

    def check_rows(self) -> None:
        """In abort mode, read every row once and raise InputError at the first bad one.

        Called before the first request, so a bad row deep in the file stops the
        job before anything is sent rather than half-way through. It costs one
        extra read of the columns the job uses. In ``fail_row`` mode bad rows
        become failed results, so there is nothing to check.
        """
        if self.fail_rows:
            return
        if self.format == "parquet" and self.mode != "messages":
            # the only row problems here are nulls: Arrow counts them without building rows
            self._check_parquet_nulls()
            return
        for _ in self.batches(_ID_CHUNK):
            pass

    def _check_parquet_nulls(self) -> None:
        assert self._pf is not None
        columns = [c for c in (self.id_column, self.spec.prompt_column if self.mode == "prompt" else None) if c]
        columns += list(self.template_columns)
        columns = [c for c in columns if self._may_hold_nulls(c)]
        if not columns:
            return
        offset = 0
        try:
            for rb in self._pf.iter_batches(batch_size=65536, columns=columns, use_threads=False):
                for name, arr in zip(rb.schema.names, rb.columns, strict=True):
                    if arr.null_count:
                        pc = compute()

                        first = pc.index(arr.is_null(), True).as_py()
                        what = ("null id" if name == self.id_column else "null prompt" if self.mode == "prompt"
                                else "null value used by prompt_template")
                        raise self._error(what, offset + first + 1, name)
                offset += rb.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"cannot read row {offset + 1} onwards: the Parquet file is damaged ({exc})") from None

    def _may_hold_nulls(self, column: str) -> bool:
        """False when every row group's statistics say the column has no nulls (then it need not be read)."""
        assert self._pf is not None
        meta = self._pf.metadata
        where = [i for i in range(meta.num_columns) if meta.schema.column(i).path == column]
        if len(where) != 1:  # a nested column: the statistics are per leaf
            return True
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(where[0]).statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                return True
        return False

    # --- rows --------------------------------------------------------------------

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        """Yield the rows in lists of up to ``batch_size``, in file order.

        Synchronous: the runner calls it from a worker thread. Each call starts
        from the beginning of the file.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if self.format == "parquet":
            return self._parquet_batches(batch_size)
        return self._jsonl_batches(batch_size)

    def _problem(self, problem: _RowProblem, index: int, line: int, row_id: str | None,
                 values: Mapping[str, Any] | None) -> Row:
        if not self.fail_rows:
            raise self._error(problem.message, line, problem.column)
        where = f"line {line}" + (f", column '{problem.column}'" if problem.column else "")
        error_values: dict[str, Any] = dict.fromkeys(self.spec.passthrough)
        if values is not None:
            error_values.update({k: values.get(k) for k in self.spec.passthrough})
        error_values[ERROR_KEY] = f"{self.path}, {where}: {problem.message}"
        return Row(index, line, row_id if row_id is not None else f"<line {line}>", None, None, error_values)

    def _parquet_batches(self, batch_size: int) -> Iterator[list[Row]]:
        assert self._pf is not None
        spec = self.spec
        needed = self._needed()
        value_columns = self.value_columns
        mode = self.mode
        index = 0
        try:
            # one thread: reading ahead on every core costs memory and buys nothing here
            batches = self._pf.iter_batches(batch_size=batch_size, columns=needed, use_threads=False)
            for rb in batches:
                n = rb.num_rows
                cols = dict(zip(rb.schema.names, rb.columns, strict=True))
                bad: dict[int, _RowProblem] = {}
                id_arr = cols[self.id_column] if self.id_column is not None else None
                if id_arr is not None and id_arr.null_count:
                    self._mark_nulls(id_arr, bad, _RowProblem("null id", self.id_column))
                ids = id_arr.to_pylist() if id_arr is not None else None
                if id_arr is not None and not _is_text(id_arr.type):
                    ids = [None if v is None else str(v) for v in ids or ()]
                prompts: list[Any] | None = None
                messages: list[Any] | None = None
                if mode == "prompt":
                    arr = cols[spec.prompt_column]
                    if arr.null_count:
                        self._mark_nulls(arr, bad, _RowProblem("null prompt", spec.prompt_column))
                    prompts = arr.to_pylist()
                elif mode == "messages":
                    assert spec.messages_column is not None
                    messages = cols[spec.messages_column].to_pylist()
                for name in self.template_columns:
                    if cols[name].null_count:
                        self._mark_nulls(cols[name], bad, _RowProblem("null value used by prompt_template", name))
                value_rows = list(zip(*(cols[c].to_pylist() for c in value_columns), strict=True)) if value_columns else None
                rows: list[Row] = []
                append = rows.append
                for i in range(n):
                    row_id = ids[i] if ids is not None else str(index)
                    values = dict(zip(value_columns, value_rows[i], strict=True)) if value_rows is not None else _EMPTY
                    problem = bad.get(i) if bad else None
                    msgs = None
                    if messages is not None and problem is None:
                        try:
                            msgs = _check_messages(messages[i])
                        except ValueError as exc:
                            problem = _RowProblem(str(exc), spec.messages_column)
                    if problem is not None:
                        append(self._problem(problem, index, index + 1, row_id, values))
                    else:
                        append(Row(index, index + 1, row_id, prompts[i] if prompts is not None else None, msgs, values))
                    index += 1
                yield rows
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"cannot read row {index + 1} onwards: the Parquet file is damaged ({exc})") from None

    @staticmethod
    def _mark_nulls(arr: pa.Array, bad: dict[int, _RowProblem], problem: _RowProblem) -> None:
        pc = compute()

        for i in pc.indices_nonzero(arr.is_null()).to_pylist():
            bad.setdefault(i, problem)

    def _jsonl_batches(self, batch_size: int) -> Iterator[list[Row]]:
        spec = self.spec
        id_column = self.id_column
        prompt_column = spec.prompt_column
        messages_column = spec.messages_column
        template_columns = self.template_columns
        value_columns = self.value_columns
        mode = self.mode
        index = 0
        rows: list[Row] = []
        with self.path.open("rb") as f:
            for lineno, obj, bad_line in self._parsed_lines(f):
                row_id: str | None = None
                prompt: str | None = None
                msgs: list[dict[str, Any]] | None = None
                values: Mapping[str, Any] | None = None
                problem: _RowProblem | None = None
                if bad_line is not None:
                    problem = _RowProblem(bad_line, None)
                else:
                    values = {c: obj.get(c) for c in value_columns} if value_columns else _EMPTY
                    if id_column is None:
                        row_id = str(index)
                    else:
                        value = obj.get(id_column)
                        if value is None:
                            problem = _RowProblem("missing or null id", id_column)
                        elif type(value) is not str and (bad := _bad_id(value)) is not None:
                            problem = _RowProblem(bad, id_column)
                        else:
                            row_id = value if type(value) is str else str(value)
                    if problem is None:
                        if mode == "prompt":
                            p = obj.get(prompt_column)
                            if type(p) is str:
                                prompt = p
                            else:
                                problem = _RowProblem(
                                    "missing prompt" if prompt_column not in obj
                                    else "null prompt" if p is None
                                    else f"the prompt must be a string, not {type(p).__name__}",
                                    prompt_column,
                                )
                        elif mode == "messages":
                            try:
                                msgs = _check_messages(obj.get(messages_column or ""))
                            except ValueError as exc:
                                problem = _RowProblem(str(exc), messages_column)
                        else:
                            for name in template_columns:
                                if obj.get(name) is None:
                                    problem = _RowProblem(
                                        "missing or null value used by prompt_template", name
                                    )
                                    break
                if problem is not None:
                    rows.append(self._problem(problem, index, lineno, row_id, values))
                else:
                    assert values is not None and row_id is not None
                    rows.append(Row(index, lineno, row_id, prompt, msgs, values))
                index += 1
                if len(rows) >= batch_size:
                    yield self._fit_passthrough(rows)
                    rows = []
        if rows:
            yield self._fit_passthrough(rows)

    def _fit_passthrough(self, rows: list[Row]) -> list[Row]:
        """Check pass-through values convert to the inferred types (JSONL only)."""
        for field in self.passthrough_schema:
            name = field.name
            try:
                pa.array([row.values.get(name) for row in rows], type=field.type)
                continue
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                pass
            for i, row in enumerate(rows):
                try:
                    pa.array([row.values.get(name)], type=field.type)
                except (pa.ArrowException, ValueError, TypeError, OverflowError):
                    problem = _RowProblem(
                        f"value does not fit the type {field.type} inferred from the first rows", name
                    )
                    fixed = dict(row.values)
                    fixed[name] = None
                    rows[i] = self._problem(problem, row.index, row.line, row.id, fixed)
        return rows
