"""Structured output: a JSON Schema the answers must follow, sent to the server and checked on return.

:class:`OutputFormat` is what a running job needs of ``[output] schema``: the
body fields that ask the server for the format (:meth:`~OutputFormat.body_fields`),
the validator every answer goes through (:mod:`batch.structured.answer`), and
the typed columns the parsed answer lands in (:mod:`batch.structured.columns`).
The schema itself is read and checked when the job is loaded (:mod:`batch.structured.load`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pyarrow as pa

from batch.structured.answer import Invalid, Validator, strip_fence
from batch.structured.columns import PARSED_COLUMN, PARSED_META, Columns
from batch.structured.load import SchemaProblem, check_schema, pointer, read_schema_file

__all__ = [
    "INVALID_COLUMN",
    "PARSED_COLUMN",
    "PARSED_META",
    "Columns",
    "Invalid",
    "OutputFormat",
    "SchemaProblem",
    "Validator",
    "check_schema",
    "pointer",
    "read_schema_file",
    "strip_fence",
]

_NAME = re.compile(r"[^A-Za-z0-9_-]")
#: the column counting a row's answers that broke the schema (each one asked again, and paid)
INVALID_COLUMN = "invalid_answers"


class OutputFormat:
    """One job's schema, ready to send, check answers by and map to columns."""

    def __init__(self, schema: dict[str, Any], *, name: str, send: bool, strict: bool,
                 flatten: bool, parse_attempts: int) -> None:
        self.schema = schema
        self.name = _NAME.sub("_", name)[:64] or "output"  # OpenAI: a-z, A-Z, 0-9, _ and -, 64 at most
        self.send = send
        self.strict = strict
        self.parse_attempts = parse_attempts
        self.validator = Validator(schema)
        self.columns = Columns(schema, flatten=flatten)
        #: the output columns after promptmill's own: the parsed answer, then ``invalid_answers``
        self.fields = [*self.columns.fields, pa.field(INVALID_COLUMN, pa.int32())]
        self.names = [f.name for f in self.fields]

    def values(self, parsed: Any, invalid: int) -> dict[str, Any]:
        """The values of :attr:`fields` for one row (``parsed`` None: no valid answer)."""
        values = self.columns.values(parsed)
        values[INVALID_COLUMN] = invalid
        return values

    def body_fields(self, endpoint: str) -> dict[str, Any]:
        """What the request body carries to ask for the format (nothing with ``send_schema = false``).

        chat: OpenAI's ``response_format`` with a ``json_schema`` (OpenAI, vLLM, SGLang,
        Atoma's backends); completions: ``guided_json``, vLLM's field for it.
        """
        if not self.send:
            return {}
        if endpoint == "chat":
            return {"response_format": {"type": "json_schema", "json_schema": {
                "name": self.name, "schema": self.schema, "strict": self.strict}}}
        return {"guided_json": self.schema}

    def fingerprint_salt(self) -> bytes:
        """What goes into the request fingerprint besides the body: the schema when it is not sent,
        so that a changed schema still redoes the rows."""
        return b"" if self.send else orjson.dumps(self.schema, option=orjson.OPT_SORT_KEYS)
