"""What every file source shares: the checks made on opening, the columns a job
uses, and the error row a bad row becomes with ``on_bad_line = "fail_row"``.

A format's source subclasses :class:`FileSource` and fills in opening its file,
checking its ids and rows, and yielding its rows in batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

from batch.errors import InputError
from batch.records import Row
from batch.spec import InputSpec

__all__ = ["FileSource", "RowProblem", "check_file", "check_messages"]

Mode = Literal["prompt", "messages", "template"]


class RowProblem(Exception):
    """A row-level problem (its message and column); becomes an InputError or an error row."""

    def __init__(self, message: str, column: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


def check_file(path: Path) -> None:
    """Refuse an input that is missing, unreadable, a folder or empty."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError("input file not found", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read the input: {exc.strerror or exc}", path=path) from None
    if path.is_dir():
        raise InputError("is a directory, not an input file", path=path)
    if size == 0:
        raise InputError("the input file is empty", path=path)


def check_messages(value: Any) -> list[dict[str, Any]]:
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


class FileSource(ABC):
    """Opens and checks an input up front, then yields its rows in batches.

    Everything that can be checked before the first request is checked in the
    constructor (the file, its columns); rows are checked as they are read.
    ``passthrough_schema`` gives the Arrow types of the pass-through columns (for
    the writer); ``num_rows`` is the row count when the format says it up front.
    """

    #: the name of the format (``input.format``)
    format: ClassVar[str]
    #: file name endings that mean this format when ``input.format = "auto"``
    suffixes: ClassVar[frozenset[str]] = frozenset()
    #: the first bytes of a file of this format, when the format has a signature
    magic: ClassVar[bytes | None] = None

    passthrough_schema: pa.Schema
    id_column: str | None

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether ``path`` is of this format by its content, whatever its ending (``"auto"`` asks first)."""
        return False

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self.fail_rows = spec.on_bad_line == "fail_row"
        self.mode: Mode = (
            "messages" if spec.messages_column is not None
            else "template" if spec.prompt_template is not None
            else "prompt"
        )
        self.template_columns = spec.template_columns
        self.value_columns: tuple[str, ...] = tuple(dict.fromkeys((*self.template_columns, *spec.passthrough)))
        self.num_rows: int | None = None
        check_file(self.path)
        self._open()

    @abstractmethod
    def _open(self) -> None:
        """Open the file, check its columns (:meth:`_check_columns`), set ``passthrough_schema``."""

    @abstractmethod
    def check_ids(self) -> None:
        """Raise InputError if an id is bad or two rows share one (nothing to do without an id column)."""

    @abstractmethod
    def check_rows(self) -> None:
        """In abort mode, read every row once and raise InputError at the first bad one.

        Called before the first request, so a bad row deep in the file stops the
        job before anything is sent rather than half-way through. In ``fail_row``
        mode bad rows become failed results, so there is nothing to check.
        """

    @abstractmethod
    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        """Yield the rows in lists of up to ``batch_size``, in file order.

        Synchronous: the runner calls it from a worker thread. Each call starts
        from the beginning of the file.
        """

    def check(self) -> None:
        """Everything :meth:`check_ids` and :meth:`check_rows` check."""
        self.check_ids()
        self.check_rows()

    # --- opening ---------------------------------------------------------------

    def _error(self, message: str, line: int | None = None, column: str | None = None) -> InputError:
        return InputError(message, path=self.path, line=line, column=column)

    def _missing(self, columns: list[str], line: int | None = None) -> InputError:
        shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
        have = f"; the input has: {shown}" if columns else ""
        spec = self.spec
        if self.mode == "messages":
            return self._error(f"no messages column{have}", line, spec.messages_column)
        return self._error(
            f"no prompt column (set input.prompt_column, messages_column or prompt_template){have}",
            line,
            spec.prompt_column,
        )

    def _check_columns(self, columns: list[str], line: int | None = None) -> None:
        """Check the input has every column the job uses; find the id column."""
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
            self.id_column = spec.id_name
        elif spec.id_column is not None:
            raise self._error("id column missing from the input", line, spec.id_column)
        else:
            self.id_column = None

    def _needed(self) -> list[str]:
        """The columns a row is made of, in order, without repeats."""
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

    # --- rows ------------------------------------------------------------------

    def _problem(self, problem: RowProblem, index: int, line: int, row_id: str | None,
                 values: Mapping[str, Any] | None) -> Row:
        """A bad row: an InputError in abort mode, else an error row (``Row.error`` says why).

        An error row has no prompt or messages; its values are its pass-through
        values (None where unreadable); its id is the row's when it could be
        read, else ``"<line N>"``. The runner writes it as a failed result
        without sending it.
        """
        if not self.fail_rows:
            raise self._error(problem.message, line, problem.column)
        where = f"line {line}" + (f", column '{problem.column}'" if problem.column else "")
        passthrough: dict[str, Any] = dict.fromkeys(self.spec.passthrough)
        if values is not None:
            passthrough.update({k: values.get(k) for k in self.spec.passthrough})
        return Row(index, line, row_id if row_id is not None else f"<line {line}>", None, None, passthrough,
                   error=f"{self.path}, {where}: {problem.message}")
