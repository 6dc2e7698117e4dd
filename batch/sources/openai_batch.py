"""Rows out of an OpenAI batch input file: one request a line, ``{custom_id, method, url, body}``.

Each line's ``custom_id`` is the row id (a string, unique in the file); its ``body``
is sent as given (``Row.body``, see :mod:`batch.prompts` for the gaps the job fills);
its ``url`` chooses the endpoint (``Row.endpoint``). A line whose method is not POST,
whose url is another endpoint, or whose body does not fit its endpoint is a bad
line: with ``on_bad_line = "fail_row"`` only that line fails.

Detected with ``input.format = "auto"`` when the first line of a JSONL file has
all four keys; the job's ``prompt_column`` and the like do not apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

from batch.records import Row
from batch.sources.base import RowProblem, check_messages
from batch.sources.jsonl import JsonlSource, _parsed_lines

__all__ = ["ENDPOINTS", "OpenAIBatchSource"]

#: The endpoint of each url a line may name.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
_KEYS = frozenset({"custom_id", "method", "url", "body"})


class OpenAIBatchSource(JsonlSource):
    """An OpenAI batch input file; ``num_rows`` is None (unknown until read)."""

    format = "openai_batch"
    suffixes = frozenset()

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether the first non-blank line of ``path`` is a JSON object with custom_id, method, url and body."""
        try:
            with path.open("rb") as f:
                for raw in f:
                    if raw.strip():
                        obj = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                        return isinstance(obj, dict) and obj.keys() >= _KEYS
        except (OSError, orjson.JSONDecodeError):
            return False
        return False

    def _open(self) -> None:
        if self.spec.passthrough:
            raise self._error("an OpenAI batch file has no columns to pass through; leave input.passthrough empty",
                              column="passthrough")
        self.mode = "prompt"
        self.value_columns = ()
        self.template_columns = ()
        self.id_column = "custom_id"
        self.passthrough_schema = pa.schema([])
        with self.path.open("rb") as f:
            if not any(problem is None for _, _, problem in _parsed_lines(f)) and not self.fail_rows:
                raise self._error("the input has no rows")

    def rows_of(self, lines: Iterable[bytes], batch_size: int) -> Iterator[list[Row]]:
        rows: list[Row] = []
        for index, (lineno, obj, bad_line) in enumerate(_parsed_lines(lines)):
            row_id = obj.get("custom_id") if type(obj.get("custom_id")) is str else None
            try:
                if bad_line is not None:
                    raise RowProblem(bad_line, None)
                rows.append(_row(index, lineno, obj))
            except RowProblem as problem:
                rows.append(self._problem(problem, index, lineno, row_id, None))
            if len(rows) >= batch_size:
                yield rows
                rows = []
        if rows:
            yield rows


def _row(index: int, line: int, obj: dict[str, Any]) -> Row:
    """A line's row, or RowProblem naming its bad key."""
    custom_id = obj.get("custom_id")
    if type(custom_id) is not str or not custom_id:
        raise RowProblem(f"custom_id must be a non-empty string, not {orjson.dumps(custom_id).decode()[:60]}",
                         "custom_id")
    method = obj.get("method")
    if method != "POST":
        raise RowProblem(f"method must be POST, not {orjson.dumps(method).decode()[:60]}", "method")
    url = obj.get("url")
    endpoint = ENDPOINTS.get(url) if isinstance(url, str) else None
    if endpoint is None:
        raise RowProblem(f"url {orjson.dumps(url).decode()[:80]} is not one of {', '.join(ENDPOINTS)}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise RowProblem("body must be a JSON object (the request body)", "body")
    if "model" in body and not isinstance(body["model"], str):
        raise RowProblem("body.model must be a string", "body")
    if endpoint == "chat":
        try:
            check_messages(body.get("messages"))
        except ValueError as exc:
            raise RowProblem(f"body: {exc}", "body") from None
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), str | list):
            raise RowProblem("body.prompt must be a string or a list", "body")
    elif not isinstance(body.get("input"), str | list) or not body["input"]:
        raise RowProblem("body.input must be a non-empty string or list", "body")
    return Row(index, line, custom_id, None, None, {}, body=body, endpoint=endpoint)
