"""Rows from the job's input, one source class per file format behind one small protocol.

:func:`open_source` picks the format (``input.format``, or by the file's ending,
else by its first bytes), opens the file and checks everything that can be
checked before the first request: the file, its columns, their types. The
runner then calls :meth:`Source.check` (ids and, in abort mode, every row) and
reads :meth:`Source.batches` from a worker thread.

A row that cannot be used (a JSONL line that is not a JSON object, a null or
non-string prompt, malformed messages, a bad or missing id) stops the job with
an :class:`~batch.errors.InputError` naming the file, line (or row) and column.
With ``on_bad_line = "fail_row"`` it becomes an error row instead: ``Row.error``
holds the message, and the runner writes it as a failed result without sending
it.

Adding a format is one module with a :class:`~batch.sources.base.FileSource`
subclass and one line in :data:`FORMATS` (and its name in ``InputSpec.format``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

from batch.records import Row
from batch.sources.base import FileSource, check_file
from batch.sources.jsonl import JsonlSource
from batch.sources.openai_batch import OpenAIBatchSource
from batch.sources.parquet import ParquetSource
from batch.spec import InputSpec

__all__ = ["FORMATS", "JsonlSource", "OpenAIBatchSource", "ParquetSource", "Source", "detect_format", "open_source"]


class Source(Protocol):
    """What the runner needs of an input, whatever its format."""

    @property
    def path(self) -> Path: ...

    @property
    def num_rows(self) -> int | None:
        """The row count when the format says it up front (for progress), else None."""

    @property
    def passthrough_schema(self) -> pa.Schema:
        """The Arrow types of the pass-through columns, for the output."""

    def check(self) -> None:
        """Raise InputError at a bad or repeated id and, in abort mode, at the first bad row."""

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        """The rows in lists of up to ``batch_size``, in file order, from the top at each call."""


#: Every input format by its name in ``input.format``. With ``"auto"`` the first
#: that ``claims`` a file ending like JSONL (or with no ending) by its content wins,
#: else the first whose ``suffixes``
#: hold the file's ending, else the first whose ``magic`` opens the file, else JSONL.
FORMATS: dict[str, type[FileSource]] = {
    "parquet": ParquetSource,
    "jsonl": JsonlSource,
    "openai_batch": OpenAIBatchSource,
}
_FALLBACK = "jsonl"


def detect_format(spec: InputSpec) -> str:
    """The format of the input: ``spec.format``, else by the file's ending, else by its first bytes."""
    if spec.format != "auto":
        return spec.format
    path = Path(spec.path)
    suffix = path.suffix.lower()
    if suffix in FORMATS["jsonl"].suffixes or not suffix:
        for name, source in FORMATS.items():
            if source.claims(path):
                return name
    for name, source in FORMATS.items():
        if suffix in source.suffixes:
            return name
    check_file(path)
    with path.open("rb") as f:
        head = f.read(16)
    for name, source in FORMATS.items():
        if source.magic is not None and head.startswith(source.magic):
            return name
    return _FALLBACK


def open_source(spec: InputSpec) -> FileSource:
    """Open and check the input ``spec`` names with the source for its format."""
    return FORMATS[detect_format(spec)](spec)
