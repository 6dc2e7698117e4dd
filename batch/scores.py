"""Scoring answers against a reference: one ``score_<name>`` column per score.

A ``ScoreSpec`` says what one score checks; a ``Scorer`` checks every spec when it
is built (a bad regex or a function that cannot be imported fails the job at load,
in one line) and then scores each answer with the row it answered.

Kinds (every column is float64; the pass/fail kinds write 1.0 or 0.0, so a mean
is a pass rate and ``batch.stats`` can tell them from numeric scores):

- ``exact_match``: the answer equals the reference column after both are trimmed,
  Unicode case-folded, NFC-normalised and their whitespace runs collapsed to one
  space ("  Paris\\n" matches "paris").
- ``contains``: the normalised reference occurs in the normalised answer.
- ``regex``: ``pattern`` is searched in the answer; group 1 if the pattern has a
  group, else the whole match, is compared with the reference as ``exact_match``
  does. No match scores 0.
- ``number``: the last number in the answer ("1,234.5", "1_000", "-3", "2e5";
  commas and underscores between thousands are dropped) is within ``tolerance``
  (absolute, up to float rounding) of the reference, a number or a text whose
  last number is taken the same way. An answer without a number scores 0.
- ``json_valid``: the whole answer parses as JSON. Needs no reference.
- ``function``: ``"package.module:function"``, imported when the scorer is built,
  called as ``fn(text, row)`` with the row's values as a dict; it returns a number
  or a bool (True is 1.0). Whatever it returns is the score, so it may be a grade.

Any kind scores the answer's text, or with ``field`` a value of the row: ``field =
"parsed.answer"`` compares the reference with the ``answer`` of a structured job's
parsed answer (a missing or null field scores None; a number or list is its JSON text).

A failed row (no text) has no scores: every column is None. A row whose reference
is null has None for the scores that need it. A function that raises, or returns
something that is not a number, gives None for that row; the first such problem
of each score is logged, the rest are not, so a broken scorer does not flood the log.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import msgspec
import orjson
import pyarrow as pa

from batch.errors import JobFileError

__all__ = ["PASS_FAIL_KINDS", "ScoreSpec", "ScoreSpecError", "Scorer"]

log = logging.getLogger(__name__)

Kind = Literal["exact_match", "contains", "regex", "number", "json_valid", "function"]
_KINDS: tuple[str, ...] = get_args(Kind)
PASS_FAIL_KINDS = frozenset({"exact_match", "contains", "regex", "number", "json_valid"})
_NEEDS_REFERENCE = frozenset({"exact_match", "contains", "regex", "number"})
_NAME = re.compile(r"\w[\w.-]*")
# The last number of a text: an optional sign not glued to a word ("10-20" is 10
# and 20), digits with optional thousands separators, decimals and exponent.
_NUMBER = re.compile(
    r"(?<![\w.])[-+\u2212]?(?:(?:\d{1,3}(?:[,_]\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
)

Check = Callable[[str, Mapping[str, Any]], float | None]


class ScoreSpecError(JobFileError, ValueError):
    """A score in the job file is wrong (bad kind, regex, or a function that will not import)."""


class ScoreSpec(msgspec.Struct, frozen=True):
    """One score: its column is ``score_<name>``; see the module docstring for the kinds."""

    name: str
    kind: Kind
    reference: str | None = None
    pattern: str | None = None
    tolerance: float = 0.0
    function: str | None = None
    # what is scored instead of the answer's text: a column of the row, dotted into a struct
    # ("parsed.answer": the field 'answer' of a structured job's parsed answer)
    field: str | None = None


def normalize(text: str) -> str:
    """Trimmed, case-folded, NFC-normalised, whitespace collapsed: what exact_match compares."""
    return " ".join(unicodedata.normalize("NFC", text.casefold()).split())


def last_number(text: str) -> float | None:
    """The last number written in ``text``, or None if it has none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    cleaned = found[-1].replace(",", "").replace("_", "").replace("\u2212", "-")
    return float(cleaned)


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _import_function(spec: ScoreSpec, path: str) -> Callable[..., Any]:
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ScoreSpecError(f"score '{spec.name}': function {path!r} is not of the form 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as error:  # a user's module may raise anything while it loads
        raise ScoreSpecError(
            f"score '{spec.name}': cannot import function {path!r} ({_one_line(error)}); "
            "is its package installed or on PYTHONPATH?"
        ) from None
    if not callable(target):
        raise ScoreSpecError(f"score '{spec.name}': {path!r} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]


class Scorer:
    """Scores answers by a list of specs; built once per job, checked when built."""

    def __init__(self, specs: Sequence[ScoreSpec]) -> None:
        self.specs = tuple(specs)
        self._reported: set[tuple[str, str]] = set()
        self._checks: list[tuple[str, Check]] = []
        self._fields: dict[str, tuple[str, ...]] = {}  # column -> the row field it scores, when not the text
        seen: set[str] = set()
        for spec in self.specs:
            if not _NAME.fullmatch(spec.name):
                raise ScoreSpecError(f"score name {spec.name!r} must be letters, digits, '_', '.' or '-'")
            if spec.name in seen:
                raise ScoreSpecError(f"score '{spec.name}' is defined twice")
            seen.add(spec.name)
            self._checks.append((f"score_{spec.name}", self._build(spec)))
            if spec.field is not None:
                self._fields[f"score_{spec.name}"] = tuple(spec.field.split("."))

    @property
    def columns(self) -> list[tuple[str, pa.DataType]]:
        """The output columns, in spec order: ``score_<name>``, all float64."""
        return [(column, pa.float64()) for column, _ in self._checks]

    def score(self, text: str | None, row: Mapping[str, Any]) -> dict[str, float | None]:
        """Every score of one answer, keyed by column name; all None when ``text`` is None."""
        if text is None:
            return {column: None for column, _ in self._checks}
        if not self._fields:
            return {column: check(text, row) for column, check in self._checks}
        scores: dict[str, float | None] = {}
        for column, check in self._checks:
            scored: str | None = text
            if column in self._fields:
                scored = _field_text(row, self._fields[column])
            scores[column] = None if scored is None else check(scored, row)
        return scores

    def _report_once(self, name: str, problem: str, message: str, *args: object) -> None:
        if (name, problem) not in self._reported:
            self._reported.add((name, problem))
            log.warning(message + " (said once for this score)", *args)

    def _build(self, spec: ScoreSpec) -> Check:
        name, kind = spec.name, spec.kind
        if kind not in _KINDS:
            raise ScoreSpecError(f"score '{name}': kind {kind!r} is not one of {', '.join(_KINDS)}")
        if kind in _NEEDS_REFERENCE and not spec.reference:
            raise ScoreSpecError(f"score '{name}': kind '{kind}' needs a 'reference' column")
        if kind not in _NEEDS_REFERENCE and spec.reference is not None:
            raise ScoreSpecError(f"score '{name}': kind '{kind}' takes no 'reference'")
        if (spec.pattern is not None) != (kind == "regex"):
            raise ScoreSpecError(f"score '{name}': 'pattern' goes with kind 'regex' (and it needs one)")
        if (spec.function is not None) != (kind == "function"):
            raise ScoreSpecError(f"score '{name}': 'function' goes with kind 'function' (and it needs one)")
        if kind == "number":
            if not (math.isfinite(spec.tolerance) and spec.tolerance >= 0):
                raise ScoreSpecError(f"score '{name}': tolerance must be a number >= 0, not {spec.tolerance!r}")
        elif spec.tolerance != 0.0:
            raise ScoreSpecError(f"score '{name}': 'tolerance' goes with kind 'number'")

        if kind == "json_valid":
            return _json_valid
        if spec.function is not None:
            return self._function_check(name, spec.function, _import_function(spec, spec.function))
        reference = spec.reference
        assert reference is not None  # checked above

        def ref(row: Mapping[str, Any]) -> Any:
            if reference not in row:
                self._report_once(name, "column", "score '%s': the row has no column '%s'; its score is None", name, reference)
                return None
            return row[reference]

        if kind == "number":
            return self._number_check(name, ref, spec.tolerance)
        if spec.pattern is not None:
            try:
                pattern = re.compile(spec.pattern)
            except re.error as error:
                raise ScoreSpecError(f"score '{name}': bad regex {spec.pattern!r}: {error}") from None
            group = 1 if pattern.groups else 0

            def regex(text: str, row: Mapping[str, Any]) -> float | None:
                expected = ref(row)
                if expected is None:
                    return None
                found = pattern.search(text)
                extracted = found.group(group) if found else None
                return float(extracted is not None and normalize(extracted) == normalize(str(expected)))

            return regex
        if kind == "contains":
            return lambda text, row: None if (r := ref(row)) is None else float(normalize(str(r)) in normalize(text))
        return lambda text, row: None if (r := ref(row)) is None else float(normalize(str(r)) == normalize(text))

    def _number_check(self, name: str, ref: Callable[[Mapping[str, Any]], Any], tolerance: float) -> Check:
        def number(text: str, row: Mapping[str, Any]) -> float | None:
            expected = ref(row)
            if expected is None:
                return None
            if isinstance(expected, str) and (parsed := last_number(expected)) is not None:
                expected = parsed
            if isinstance(expected, bool) or not isinstance(expected, int | float):
                self._report_once(name, "reference", "score '%s': reference %r is not a number; its score is None", name, expected)
                return None
            got = last_number(text)
            if got is None:
                return 0.0
            slack = 1e-9 * max(1.0, abs(got), abs(expected))  # 1.01 - 1.00 is 0.0100000000000000089
            return float(abs(got - expected) <= tolerance + slack)

        return number

    def _function_check(self, name: str, path: str, fn: Callable[..., Any]) -> Check:
        def function(text: str, row: Mapping[str, Any]) -> float | None:
            try:
                value = fn(text, dict(row))
            except Exception as error:  # the user's code: any failure is this row's None
                self._report_once(name, "raised", "score '%s': %s raised %s; the score is None where it raises", name, path, _one_line(error))
                return None
            if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
                return float(value)
            if value is not None:
                self._report_once(name, "returned", "score '%s': %s returned %r, not a number or bool; the score is None", name, path, value)
            return None

        return function


def _field_text(row: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    """The row's value at a dotted path (into struct columns) as text; None when absent or null."""
    value: Any = row
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _json_valid(text: str, row: Mapping[str, Any]) -> float | None:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return 0.0
    return 1.0
