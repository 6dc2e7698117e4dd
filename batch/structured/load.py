"""Reading and checking a job's JSON Schema at load: every mistake is one line with its JSON pointer.

Two checks, both before anything is sent:

- the schema against its draft's metaschema, by ``jsonschema`` (its ``check_schema``
  reports where in the schema a mistake is, which becomes the pointer);
- every keyword against those the answer validator (``fastjsonschema``, see
  :mod:`batch.structured.answer`) implements: an unknown or unsupported keyword
  (a 2020-12 ``prefixItems``, a misspelt ``propertise``) would otherwise be
  ignored silently and let answers through that the user meant to refuse.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

__all__ = ["SchemaProblem", "check_schema", "pointer", "read_schema_file"]

# Drafts fastjsonschema implements, by their $schema URI (without the trailing '#');
# no $schema is draft-07, as in fastjsonschema.
DRAFTS = {
    "http://json-schema.org/draft-04/schema": "draft4",
    "http://json-schema.org/draft-06/schema": "draft6",
    "http://json-schema.org/draft-07/schema": "draft7",
}
# Keywords that hold no constraint (annotations) or that the validator resolves
# through another keyword ($ref, definitions, then/else with if, additionalItems with items).
_NOT_CHECKED = frozenset({
    "$schema", "$id", "id", "$ref", "$comment", "$defs", "definitions", "title", "description",
    "default", "examples", "readOnly", "writeOnly", "deprecated", "then", "else", "additionalItems",
})
# where subschemas sit: a keyword holding one, a map of them, or a list of them
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not",
        "if", "then", "else")
_MAP = ("properties", "patternProperties", "definitions", "$defs", "dependencies")
_LIST = ("allOf", "anyOf", "oneOf", "items")


class SchemaProblem(ValueError):
    """A mistake in a schema: ``path`` is where (the keys from the schema's root), ``message`` what."""

    def __init__(self, message: str, path: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    @property
    def pointer(self) -> str:
        return pointer(self.path)


def pointer(path: Sequence[str | int]) -> str:
    """An RFC 6901 JSON pointer (``/properties/a~1b/0``); the root is ``/``."""
    if not path:
        return "/"
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def read_schema_file(path: Path) -> Any:
    """The JSON document in ``path``; ``SchemaProblem`` (at the root) when it cannot be read or parsed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SchemaProblem(f"cannot read the schema file: {exc.strerror or exc}", ()) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaProblem(f"not valid JSON ({exc})", ()) from None


def _validator_keywords(draft: str) -> frozenset[str]:
    from fastjsonschema.draft04 import CodeGeneratorDraft04
    from fastjsonschema.draft06 import CodeGeneratorDraft06
    from fastjsonschema.draft07 import CodeGeneratorDraft07

    cls = {"draft4": CodeGeneratorDraft04, "draft6": CodeGeneratorDraft06, "draft7": CodeGeneratorDraft07}[draft]
    return frozenset(cls({})._json_keywords_to_function)  # type: ignore[no-untyped-call]


def _subschemas(node: Mapping[str, Any], path: tuple[str | int, ...]) -> Iterator[tuple[Any, tuple[str | int, ...]]]:
    for key in _ONE:
        if isinstance(node.get(key), dict):
            yield node[key], (*path, key)
    for key in _MAP:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                if isinstance(sub, dict):
                    yield sub, (*path, key, name)
    for key in _LIST:
        value = node.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                if isinstance(sub, dict):
                    yield sub, (*path, key, i)


def check_schema(schema: Any) -> str:
    """Check a schema; returns the draft it is validated by. Raises :class:`SchemaProblem`."""
    if not isinstance(schema, dict):
        raise SchemaProblem(f"a schema must be a JSON object, not {type(schema).__name__}", ())
    uri = schema.get("$schema", "http://json-schema.org/draft-07/schema")
    draft = DRAFTS.get(str(uri).rstrip("#"))
    if draft is None:
        raise SchemaProblem(
            f"$schema {uri!r} is not a draft the validator supports (draft-04, -06 or -07; leave $schema out "
            "for draft-07)", ("$schema",))
    import jsonschema  # type: ignore[import-untyped]  # no stubs shipped; used once, at load

    cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        raise SchemaProblem(error.message, tuple(error.absolute_path))
    known = _validator_keywords(draft) | _NOT_CHECKED
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        for key in node:
            if key not in known:
                raise SchemaProblem(f"keyword {key!r} is not supported by the validator ({draft}); "
                                    "it would be ignored, so it is refused", (*path, key))
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise SchemaProblem(f"$ref {ref!r} is not a reference inside this schema (#/...)", (*path, "$ref"))
        stack.extend(_subschemas(node, path))
    return draft
