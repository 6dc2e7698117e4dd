"""The id checks every source shares, written once.

An id is a string or a number; the output holds it as text (``str()`` of the
value). A null or missing id, a boolean, a list or an object is refused: the
source turns the :class:`~batch.sources.base.RowProblem` raised here into one
line naming the file, line and column (or, with ``on_bad_line = "fail_row"``,
into an error row). Two rows with the same id are refused too, naming the first
few repeats and where they occur.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

from batch._startup import compute
from batch.arrowutil import is_text
from batch.sources.base import RowProblem

__all__ = ["MISSING_ID", "NULL_ID", "check_arrow_type", "duplicates", "first_null", "json_id", "null_rows",
           "text_array", "texts"]

NULL_ID = "null id"  # Arrow: the column is there, the value is null
MISSING_ID = "missing or null id"  # JSON: the key may be absent too
_FEW = 5  # duplicates named in the message


def _not_an_id(what: str) -> str:
    return f"an id must be a string or a number, not {what}"


def json_id(value: Any, column: str) -> str:
    """The id a JSON value gives, as text; a missing or null value, a boolean, list or object raises."""
    if type(value) is str:
        return value
    if value is None:
        raise RowProblem(MISSING_ID, column)
    if isinstance(value, bool | list | dict):
        shown = orjson.dumps(value).decode()
        shown = shown if len(shown) <= 40 else shown[:39] + "…"
        raise RowProblem(_not_an_id(f"{type(value).__name__} {shown}"), column)
    return str(value)


def check_arrow_type(t: pa.DataType, column: str) -> None:
    """Refuse a column whose type cannot hold ids (booleans, lists, structs, maps)."""
    if pa.types.is_boolean(t) or pa.types.is_nested(t):
        raise RowProblem(_not_an_id(str(t)), column)


def null_rows(ids: pa.Array) -> list[int]:
    """The positions of the null ids in an Arrow column."""
    if not ids.null_count:
        return []
    return list(compute().indices_nonzero(ids.is_null()).to_pylist())


def first_null(ids: pa.Array) -> int | None:
    """The position of the first null id in an Arrow column, or None."""
    if not ids.null_count:
        return None
    return int(compute().index(ids.is_null(), True).as_py())


def texts(ids: pa.Array) -> list[str | None]:
    """An Arrow id column as text, ``None`` where null (numbers as ``str()`` gives them)."""
    values: list[Any] = ids.to_pylist()
    return values if is_text(ids.type) else [None if v is None else str(v) for v in values]


def text_array(ids: pa.Array) -> pa.Array:
    """An Arrow id column as a string array, for counting repeats."""
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        return ids
    if pa.types.is_floating(ids.type):  # Arrow's float to text differs from str()
        return pa.array(texts(ids), pa.string())
    return compute().cast(ids, pa.string())


def duplicates(ids: pa.Array, lines: pa.Array | None, unit: str) -> tuple[str, int] | None:
    """``(message, line of the first repeat)`` when two ids are equal, else None.

    ``ids`` are text; ``lines`` the line of each (None: the row number, 1-based);
    ``unit`` names a position in the message (``"row"`` or ``"line"``).
    """
    pc = compute()

    counts = pc.value_counts(ids.drop_null())
    dups = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dups) == 0:
        return None
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
    shown = ", ".join(f"'{value}' ({unit}s {', '.join(map(str, where))})" for value, where in first)
    more = f" and {len(dups) - len(first)} more" if len(dups) > len(first) else ""
    return f"duplicate ids: {shown}{more}; every id must be unique", first[0][1][1]
