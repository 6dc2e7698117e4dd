"""How a job file's mistake is told: where it is (file, line, key) and what is wrong, in words.

- :func:`describe` turns a ``msgspec.ValidationError`` into (message, key path). The path
  comes from the one documented part of msgspec's message, its `` - at `$.a.b[0]` `` suffix
  (:func:`split_path`); the words come from the field's *type* (``msgspec.inspect``) and the
  value found there, never from msgspec's wording, so a msgspec upgrade cannot change them.
- :class:`Located` turns a key path into a :class:`~batch.errors.JobFileError` with the line
  that names the key, found by :func:`key_lines` in a real TOML syntax tree.
- :func:`shown` quotes a bad value, unless it may be a secret.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import msgspec
import msgspec.inspect as mi

from batch.errors import JobFileError

if TYPE_CHECKING:
    from tree_sitter import Node

__all__ = ["NOT_SHOWN", "Key", "Located", "describe", "dotted", "key_lines", "looks_secret", "shown",
           "split_path", "toml_syntax_error", "with_value"]

Key = tuple[str | int, ...]  # a path into the job: table and key names, array indices

# --- quoting a bad value ------------------------------------------------------------------

_SHOWN_CHARS = 60  # a bad value is quoted up to this long
# a value that is one token as long as an API key (sk-..., a hex or base64 secret)
_TOKEN_LIKE = re.compile(r"\s*(?=[^\s]*\d)[A-Za-z0-9_\-]{20,}\s*")
NOT_SHOWN = "the value (not quoted: it may be a key)"
_SECRET_NAMES = frozenset(
    {"api_key", "apikey", "key", "token", "api_token", "access_token", "secret", "password",
     "authorization", "bearer", "auth"}
)
_SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password")


def looks_secret(name: str) -> bool:
    """Whether a setting or variable name says it holds a secret (``api_key``, ``OPENAI_API_KEY``)."""
    norm = name.strip().lower().replace("-", "_")
    if norm == "api_key_env":
        return False
    return norm in _SECRET_NAMES or norm.endswith(_SECRET_SUFFIXES)


def _may_be_secret(text: str) -> bool:
    """A key pasted in the wrong place: token-shaped, a bearer header, or holding the value
    of an environment variable named like a key (ATOMA_API_KEY, OPENAI_API_KEY, ...)."""
    if _TOKEN_LIKE.fullmatch(text) or text.lstrip().lower().startswith("bearer "):
        return True
    return any(len(secret) >= 8 and secret in text
               for name, secret in os.environ.items() if looks_secret(name))


def shown(value: Any) -> str | None:
    """A bad value as an error quotes it (clipped), or None for one that may be a secret."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date | time):
        return value.isoformat()
    text = repr(value)
    if _may_be_secret(value if isinstance(value, str) else text):
        return None
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def with_value(value: Any, message: str) -> str:
    """``'ht!tp:/x' is not ...``: the message with the value in front (never one that may be a secret)."""
    quoted = shown(value)
    return f"{NOT_SHOWN if quoted is None else quoted} {message}"


# --- msgspec's failures in words ----------------------------------------------------------

# msgspec documents its error messages as "<what> - at `$.path[0]`"; only that suffix is read.
_AT = re.compile(r" - at `\$((?:\.[^.\[`]+|\[(?:\d+|\.\.\.)\])*)`$")
_PART = re.compile(r"\.([^.\[`]+)|\[(\d+|\.\.\.)\]")


def split_path(message: str) -> tuple[str, Key]:
    """``"Expected ... - at `$.a.b[0]`"`` as ``("Expected ...", ("a", "b", 0))``.

    A dict value's path (``[...]``, which msgspec gives without the key) stops at the dict.
    A message without the suffix is about the whole value: ``(message, ())``.
    """
    m = _AT.search(message)
    if m is None:
        return message, ()
    key: list[str | int] = []
    for name, index in _PART.findall(m.group(1)):
        if index == "...":
            break
        key.append(name or int(index))
    return message[: m.start()], tuple(key)


_MISSING: Any = object()


def _value_at(data: Any, key: Key) -> Any:
    for part in key:
        there = (isinstance(data, Mapping) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data))
        if not there:
            return _MISSING
        data = data[part]
    return data


def _fits(t: mi.Type, value: Any) -> bool:
    """Whether ``value`` is of the kind ``t`` takes, constraints aside."""
    match t:
        case mi.AnyType():
            return True
        case mi.UnionType(types=types):
            return any(_fits(member, value) for member in types)
        case mi.LiteralType(values=values):
            return value in values
        case mi.BoolType():
            return isinstance(value, bool)
        case mi.IntType():
            return isinstance(value, int) and not isinstance(value, bool)
        case mi.FloatType():
            return isinstance(value, int | float) and not isinstance(value, bool)
        case mi.StrType():
            return isinstance(value, str)
        case mi.CustomType(cls=cls):
            return cls is Path and isinstance(value, str)
        case mi.ListType() | mi.VarTupleType() | mi.TupleType() | mi.SetType() | mi.FrozenSetType():
            return isinstance(value, list)
        case mi.DictType() | mi.StructType() | mi.TypedDictType():
            return isinstance(value, dict)
        case mi.DateTimeType():
            return isinstance(value, datetime)
        case mi.DateType():
            return isinstance(value, date) and not isinstance(value, datetime)
        case mi.TimeType():
            return isinstance(value, time)
        case mi.NoneType():
            return value is None
    return False


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    """A ``Literal``'s values in the order written (``msgspec.inspect`` sorts them)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(v for arg in get_args(annotation) for v in _literal_values(arg))


def _wanted(t: mi.Type, written: tuple[Any, ...] = ()) -> str:
    """``an integer``, ``a string or a list``, ``'chat' or 'completions'``: what a type takes
    (a ``Literal``'s values in the ``written`` order when given)."""
    match t:
        case mi.UnionType(types=types):
            return " or ".join(_wanted(member, written) for member in types if not isinstance(member, mi.NoneType))
        case mi.LiteralType(values=values):
            ordered = [v for v in written if v in values] if set(values) <= set(written) else values
            allowed = [repr(v) for v in ordered]
            return f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        case mi.BoolType():
            return "true or false"
        case mi.IntType():
            return "an integer"
        case mi.FloatType():
            return "a number"
        case mi.StrType():
            return "a string"
        case mi.CustomType(cls=cls) if cls is Path:
            return "a path"
        case mi.ListType() | mi.VarTupleType() | mi.TupleType() | mi.SetType() | mi.FrozenSetType():
            return "a list"
        case mi.DictType() | mi.StructType() | mi.TypedDictType():
            return "a table"
        case mi.DateTimeType():
            return "a date and time"
        case mi.DateType():
            return "a date"
        case mi.TimeType():
            return "a time"
    return type(t).__name__.removesuffix("Type").lower()


def _kind_of(value: Any) -> str:
    """What a TOML value is, in the words of :func:`_wanted` (``true``/``false`` is a boolean)."""
    if isinstance(value, bool):
        return "a boolean"
    for kind, words in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
                        (dict, "a table"), (datetime, "a date and time"), (date, "a date"), (time, "a time")):
        if isinstance(value, kind):
            return words
    return type(value).__name__


def _number(bound: float) -> str:
    return str(int(bound)) if isinstance(bound, float) and bound.is_integer() else str(bound)


def _bound_broken(t: mi.IntType | mi.FloatType, value: float) -> str | None:
    """``>= 1``: the bound of ``t`` that ``value`` breaks (an integer's ``> 0`` said as ``>= 1``)."""
    step = 1 if isinstance(t, mi.IntType) else 0
    if t.ge is not None and value < t.ge:
        return f">= {_number(t.ge)}"
    if t.gt is not None and value <= t.gt:
        return f">= {_number(t.gt + 1)}" if step else f"> {_number(t.gt)}"
    if t.le is not None and value > t.le:
        return f"<= {_number(t.le)}"
    if t.lt is not None and value >= t.lt:
        return f"<= {_number(t.lt - 1)}" if step else f"< {_number(t.lt)}"
    return None


def _type_at(t: mi.Type, key: Key, data: Any) -> tuple[mi.Type, Any] | None:
    """The type of the value at ``key`` below a value ``data`` of type ``t``, with its
    annotation as written when it is a Struct's field (else None)."""
    annotation: Any = None
    for part in key:
        if isinstance(t, mi.UnionType):  # the member of the kind the data is
            t = next((m for m in t.types if _fits(m, data)), t)
        annotation = None
        match t:
            case mi.StructType(cls=cls, fields=fields):
                t = next((f.type for f in fields if f.encode_name == part), mi.AnyType())
                annotation = next((f.type for f in msgspec.structs.fields(cls) if f.encode_name == part), None)
            case mi.DictType(value_type=value_type):
                t = value_type
            case mi.ListType(item_type=item) | mi.VarTupleType(item_type=item) | mi.SetType(item_type=item):
                t = item
            case mi.AnyType():
                return t, None
            case _:
                return None
        data = _value_at(data, (part,))
    return t, annotation


def _problem(t: mi.Type, value: Any, written: tuple[Any, ...] = ()) -> tuple[str, Key] | None:
    """What is wrong with ``value`` for type ``t``, and below which key, else None."""
    if isinstance(t, mi.UnionType) and _fits(t, value):  # the member of the value's kind
        t = next(m for m in t.types if _fits(m, value))
    if isinstance(t, mi.StructType) and isinstance(value, dict):
        names = {f.encode_name for f in t.fields}
        if t.forbid_unknown_fields:
            unknown = next((k for k in value if k not in names), None)
            if unknown is not None:
                return "unknown key", (unknown,)
        missing = next((f.encode_name for f in t.fields if f.required and f.encode_name not in value), None)
        return ("required key is missing", (missing,)) if missing is not None else None
    if not _fits(t, value):
        if isinstance(t, mi.LiteralType):
            return f"should be {_wanted(t, written)}", ()
        return f"should be {_wanted(t, written)}, not {_kind_of(value)}", ()
    if isinstance(t, mi.IntType | mi.FloatType):
        bound = _bound_broken(t, value)
        if bound is not None:
            return f"should be {_wanted(t)} {bound}", ()
    return None


def describe(exc: msgspec.ValidationError, cls: Any, data: Any) -> tuple[str, Key]:
    """A ``ValidationError`` from ``msgspec.convert(data, cls)`` as (message, key path).

    A message about a value quotes it (see :func:`with_value`). A failure these types
    cannot explain (none in promptmill's own specs) keeps msgspec's words.
    """
    text, key = split_path(str(exc))
    typed = _type_at(mi.type_info(cls), key, data)
    value = _value_at(data, key)
    found = None
    if typed is not None and value is not _MISSING:
        found = _problem(typed[0], value, _literal_values(typed[1]))
    message, below = found or (text[:1].lower() + text[1:], ())
    if below:  # an unknown or missing key: no value to quote
        return message, (*key, *below)
    return (with_value(value, message) if key and value is not _MISSING else message), key


# --- where a key is -----------------------------------------------------------------------


def toml_syntax_error(exc: tomllib.TOMLDecodeError, text: str) -> tuple[str, int | None]:
    """tomllib's error as (message with its column, line).

    Python 3.14 gives ``lineno``/``colno``; before, the position is only in the message's
    fixed ending, ``(at line 3, column 6)`` or ``(at end of document)``, which is read here.
    """
    message = getattr(exc, "msg", None) or str(exc)
    line, column = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    if line is None and (m := re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)):
        line, column, message = int(m.group(1)), int(m.group(2)), message[: m.start()]
    elif line is None and (m := re.search(r"\s*\(at end of document\)$", message)):
        line, message = text.count("\n") + 1, message[: m.start()]
        return f"{message} (at the end of the file)", line
    if column is not None:
        message = f"{message} (column {column})"
    return message, line


def _key_parts(node: Node) -> Iterator[str]:
    """The names of a key node (``a."b.c".d``), unquoted by tomllib itself."""
    if node.type == "dotted_key":
        for child in node.named_children:
            yield from _key_parts(child)
    elif node.type == "bare_key":
        yield (node.text or b"").decode()
    else:  # quoted_key
        yield next(iter(tomllib.loads(f"{(node.text or b'').decode()} = 0")))


def _named(node: Node) -> list[Node]:
    """A node's named children, comments left out."""
    return [n for n in node.named_children if n.type != "comment"]


def key_lines(text: str) -> dict[Key, int]:
    """Every table, key and array element of a TOML text, mapped to the line (1-based) that
    first names it; an array of tables' elements are indexed like msgspec's paths (``a[1].b``).

    Only called when an error needs a line: it imports tree-sitter. Chosen because its TOML
    syntax tree gives every key's row and column; tomllib and tomlkit keep no positions
    for keys (tomlkit only for its own parse errors).
    """
    from tree_sitter import Language, Parser
    from tree_sitter_toml import language

    root = Parser(Language(language())).parse(text.encode()).root_node
    lines: dict[Key, int] = {}
    elements: dict[Key, int] = {}  # array-of-tables path -> elements so far

    def resolve(parts: list[str]) -> Key:
        key: Key = ()
        for part in parts:
            key = (*key, part)
            if key in elements:
                key = (*key, elements[key] - 1)
        return key

    def value(node: Node, key: Key) -> None:
        lines.setdefault(key, node.start_point.row + 1)
        if node.type == "inline_table":
            for pair in node.named_children:
                if pair.type == "pair":
                    keyed(pair, key)
        elif node.type == "array":
            for i, item in enumerate(_named(node)):
                value(item, (*key, i))

    def keyed(pair: Node, table: Key) -> None:
        key_node, *_, value_node = _named(pair)
        parts = list(_key_parts(key_node))
        for i in range(1, len(parts)):
            lines.setdefault((*table, *parts[:i]), pair.start_point.row + 1)
        value(value_node, (*table, *parts))

    for node in root.named_children:
        if node.type == "pair":
            keyed(node, ())
        elif node.type in ("table", "table_array_element"):
            parts = list(_key_parts(_named(node)[0]))
            row = node.start_point.row + 1
            if node.type == "table_array_element":
                array = (*resolve(parts[:-1]), parts[-1])
                lines.setdefault(array, row)
                elements[array] = elements.get(array, 0) + 1
                table: Key = (*array, elements[array] - 1)
            else:
                table = resolve(parts)
            for i in range(1, len(table) + 1):
                lines.setdefault(table[:i], row)
            for pair in node.named_children[1:]:
                if pair.type == "pair":
                    keyed(pair, table)
    return lines


def dotted(key: Key) -> str:
    """``("input", "passthrough", 0)`` as ``input.passthrough[0]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in key).removeprefix(".")


class Located:
    """Turns a key path into a JobFileError with the job file's line (or "set by an override")."""

    def __init__(self, path: Path | None, text: str, overridden: set[str]) -> None:
        self.path = path
        self.text = text
        self.overridden = overridden

    def error(self, message: str, key: Key) -> JobFileError:
        name = dotted(key) or None
        for i in range(len(key), 0, -1):
            if dotted(key[:i]) in self.overridden:
                return JobFileError(f"{message} (set by an override)", key=name)
        lines = key_lines(self.text) if self.text else {}
        line = next((lines[key[:i]] for i in range(len(key), 0, -1) if key[:i] in lines), None)
        return JobFileError(message, path=self.path, line=line, key=name)
