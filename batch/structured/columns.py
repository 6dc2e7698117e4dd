"""Typed Parquet columns from a JSON Schema, and a parsed answer as their values.

``object`` with ``properties`` → struct (a field not ``required``, or whose type
allows ``null``, is nullable), ``array`` with ``items`` → list, ``string`` →
string, ``integer`` → int64, ``number`` → float64, ``boolean`` → bool, an
``enum`` (or ``const``) of strings → string, dictionary-encoded in the Parquet
file (and an Arrow dictionary column when flattened; nested in a struct it is a
plain string column, since pyarrow reads a dictionary under a null struct back
from Parquet with indices into an empty dictionary). ``["string",
"null"]`` and ``anyOf``/``oneOf`` of one type and ``null`` are that type, nullable.
What has no single Arrow type (``oneOf`` of different types, an object without
``properties``, an array without ``items``, a recursive ``$ref``, ...) is kept as
JSON text in a string column, and :attr:`Columns.as_text` lists where, so the
load can say so. Properties beyond those the schema declares are not columns
(the ``text`` column keeps the whole answer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pyarrow as pa

from batch.structured.load import pointer

__all__ = ["PARSED_COLUMN", "PARSED_META", "Columns"]

PARSED_COLUMN = "parsed"
#: field metadata marking a column of the parsed answer (its type follows the schema, which may change)
PARSED_META = {b"promptmill": b"parsed"}

Convert = Callable[[Any], Any]
_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(),
}
_ENUM = pa.dictionary(pa.int32(), pa.string())


def _same(value: Any) -> Any:
    return value


def _json_text(value: Any) -> Any:
    return None if value is None else orjson.dumps(value).decode()


class _Mapper:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.as_text: list[str] = []

    def resolve(self, node: Mapping[str, Any], seen: tuple[str, ...]) -> tuple[Mapping[str, Any], tuple[str, ...]] | None:
        while isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen:
                return None  # recursive: no finite Arrow type
            seen = (*seen, ref)
            target: Any = self.root
            for part in ref.lstrip("#").split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                return None
            node = target
        return node, seen

    def text(self, path: tuple[str | int, ...], why: str) -> tuple[pa.DataType, bool, Convert]:
        self.as_text.append(f"{pointer(path)} ({why})")
        return pa.string(), True, _json_text

    def map(self, node: Any, path: tuple[str | int, ...], seen: tuple[str, ...] = ()) -> tuple[pa.DataType, bool, Convert]:
        """(Arrow type, nullable, converter) of one subschema."""
        if not isinstance(node, dict):
            return self.text(path, "a schema of true/false")
        resolved = self.resolve(node, seen)
        if resolved is None:
            return self.text(path, "a recursive or unresolvable $ref")
        node, seen = resolved
        nullable = False
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list):
                rest = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
                if len(rest) != 1:
                    return self.text(path, f"{key} of {len(rest)} different schemas")
                kind, _, convert = self.map(rest[0], (*path, key, branches.index(rest[0])), seen)
                return kind, len(rest) < len(branches), convert
        values = node.get("enum", [node["const"]] if "const" in node else None)
        if isinstance(values, list):
            if None in values:
                nullable = True
            if all(isinstance(v, str) for v in values if v is not None):
                # a string: pyarrow reads a dictionary nested under a null struct back broken
                # from Parquet (indices into an empty dictionary); flattened, it is a dictionary
                return pa.string(), nullable, _same
            return self.text(path, "an enum of values that are not all strings")
        kind = node.get("type")
        if isinstance(kind, list):
            nullable = "null" in kind
            kinds = [k for k in kind if k != "null"]
            if len(kinds) != 1:
                return self.text(path, f"type {kind}")
            kind = kinds[0]
        if kind is None and "properties" in node:
            kind = "object"
        if kind in _SCALARS:
            return _SCALARS[kind], nullable, _same
        if kind == "object" and isinstance(node.get("properties"), dict):
            struct, convert = self.struct(node, path, seen)
            return struct, nullable, convert
        if kind == "array" and isinstance(node.get("items"), dict):
            item, item_null, convert = self.map(node["items"], (*path, "items"), seen)
            field = pa.field("item", item, nullable=item_null)
            if convert is _same:
                return pa.list_(field), nullable, _same
            return pa.list_(field), nullable, lambda v: None if v is None else [convert(x) for x in v]
        return self.text(path, f"type {kind}" if kind else "no type")

    def struct(self, node: Mapping[str, Any], path: tuple[str | int, ...], seen: tuple[str, ...]) -> tuple[pa.DataType, Convert]:
        required = set(node.get("required") or ())
        fields = []
        converters: list[tuple[str, Convert]] = []
        for name, sub in node["properties"].items():
            kind, nullable, convert = self.map(sub, (*path, "properties", name), seen)
            fields.append(pa.field(name, kind, nullable=nullable or name not in required))
            converters.append((name, convert))
        if all(c is _same for _, c in converters):
            return pa.struct(fields), _same  # pyarrow takes a dict and ignores keys it has no field for
        return pa.struct(fields), lambda v: None if v is None else {n: c(v.get(n)) for n, c in converters}


def _is_enum(node: Any) -> bool:
    return isinstance(node, dict) and ("enum" in node or "const" in node)


class Columns:
    """The output columns of a schema: one ``parsed`` struct, or (``flatten``) its fields at the top."""

    def __init__(self, schema: Mapping[str, Any], *, flatten: bool) -> None:
        mapper = _Mapper(schema)
        kind, _, convert = mapper.map(schema, ())
        self.flatten = flatten and pa.types.is_struct(kind)
        if self.flatten:
            # every top-level column may be null: a failed row has no answer
            props = schema.get("properties") or {}
            self.fields = [pa.field(f.name, _ENUM if f.type == pa.string() and _is_enum(props.get(f.name)) else f.type,
                                    nullable=True, metadata=PARSED_META) for f in kind]
        else:
            self.fields = [pa.field(PARSED_COLUMN, kind, nullable=True, metadata=PARSED_META)]
        self.as_text = tuple(mapper.as_text)
        self._convert = convert
        self._names = [f.name for f in self.fields]

    @property
    def names(self) -> list[str]:
        return self._names

    def values(self, parsed: Any) -> dict[str, Any]:
        """Column name → value of one answer (None: a failed row)."""
        value = self._convert(parsed) if parsed is not None else None
        if not self.flatten:
            return {PARSED_COLUMN: value}
        if value is None:
            return dict.fromkeys(self._names)
        return {name: value.get(name) for name in self._names}
