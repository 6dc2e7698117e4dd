"""Every error promptmill raises, under one base class.

    PromptmillError                 base; ``exit_code`` is what the CLI exits with
    ├── UsageError (exit 2)         bad job file, option, input or output: nothing was sent
    │   ├── JobFileError            names the job file, its line and the key
    │   ├── InputError              names the input file, its line (or row) and column
    │   └── OutputError             names the output path
    ├── JobStopped (exit 3)         a fatal server answer (401, 402, 403, spent quota), an
    │   │                           outage, a wait past retry.outage_s; finished rows kept
    │   ├── BudgetReached (exit 4)  the budget (--budget-usd) is spent: nothing more was sent
    │   ├── InputChanged (exit 65)  the input file changed while the job read it
    │   └── DiskError (exit 74)     a part, the output or the summary could not be written
    │                               (ENOSPC, EDQUOT, EIO, EROFS, ...); parts on disk kept
    ├── TransientStop (exit 75)     a stop a retry a little later should fix
    │   └── OutputBusy              another run holds the output's lock
    └── RequestError                one row's request failed; carries ``row_id`` like
        │                           httpx errors carry ``.request``
        ├── APIStatusError          the server answered with a non-2xx status
        ├── APIConnectionError      connect error, timeout, connection dropped
        └── ResponseError           2xx but the body is unparseable, of the wrong
            │                       shape, or the stream was cut off
            ├── BadValueError       2xx whose value cannot be stored (a token count
            │                       beyond range): the row fails, ``code = "bad_response"``
            └── InvalidOutputError  2xx whose answer is not JSON or breaks the job's schema:
                                    asked again, ``code = "invalid_output"``

Whether a ``RequestError`` is retried, ends the row, or stops the job is decided
in one place, ``batch.retry``, from the outcome table in the design.

``EXIT_REASONS`` is the command's exit-code contract for schedulers (cron,
Airflow): every code it may exit with and what it means. The codes are stable;
tests pin each one.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch.summary import Summary

__all__ = [
    "EXIT_REASONS",
    "APIConnectionError",
    "APIStatusError",
    "BadValueError",
    "BudgetReached",
    "DiskError",
    "InputChanged",
    "InputError",
    "InvalidOutputError",
    "JobFileError",
    "JobStopped",
    "OutputBusy",
    "OutputError",
    "PromptmillError",
    "RequestError",
    "ResponseError",
    "TransientStop",
    "UsageError",
]

# The exit codes of ``promptmill run``, one line each (the README's table says the same).
# 65 and 74 follow sysexits.h (EX_DATAERR, EX_IOERR), as 75 (EX_TEMPFAIL) does.
EXIT_REASONS: dict[int, str] = {
    0: "all rows ok (also: nothing left to do on a rerun)",
    1: "finished with failed rows (more than --max-failed-fraction of them)",
    2: "bad job file, option, input or output: nothing was sent",
    3: "stopped by a fatal answer (401, 402, 403, spent quota) or an outage (retry.outage_s); finished rows kept",
    4: "stopped at the budget (--budget-usd, limits.budget_usd): nothing past it was sent; finished rows kept",
    65: "the input changed under the job: finished rows kept",
    74: "a disk error (EX_IOERR) while reading or writing: finished rows kept",
    75: "a transient stop a retry should fix (EX_TEMPFAIL): another run holds the output's lock",
    130: "stopped by SIGINT after keeping what was done",
    143: "stopped by SIGTERM after keeping what was done",
}


class PromptmillError(Exception):
    """Base of every promptmill error."""

    exit_code = 1


class UsageError(PromptmillError):
    """The job cannot start: its file, options, input or output are wrong."""

    exit_code = 2


def _where(path: Path | str | None, line: int | None, column: int | None = None) -> str:
    parts = []
    if path is not None:
        parts.append(str(path))
    if line is not None:
        parts.append(f"line {line}")
    if column is not None:
        parts.append(f"column {column}")
    return ", ".join(parts)


class JobFileError(UsageError):
    """The job file (or an option overriding it) is wrong."""

    def __init__(
        self, message: str, *, path: Path | str | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        where = _where(path, line)
        if key is not None:
            where = f"{where}, key '{key}'" if where else f"key '{key}'"
        super().__init__(f"{where}: {message}" if where else message)


class InputError(UsageError):
    """The input file is missing, unreadable, or a row in it is wrong."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = _where(path, line)
        if column is not None:
            where = f"{where}, column '{column}'" if where else f"column '{column}'"
        super().__init__(f"{where}: {message}" if where else message)


class OutputError(UsageError):
    """The output path cannot be created or written."""

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class JobStopped(PromptmillError):
    """A server answer that every further request would get too (bad key, no balance)."""

    exit_code = 3

    def __init__(self, message: str, *, cause: RequestError | None = None) -> None:
        self.cause = cause
        self.summary: Summary | None = None  # the stopped run's summary, set by batch.api
        super().__init__(message)


class BudgetReached(JobStopped):
    """The next row's worst-case cost would pass the budget: it and the rest were not sent."""

    exit_code = 4


class InputChanged(JobStopped):
    """The input's size or modification time changed while the job read it (requests were sent)."""

    exit_code = 65  # EX_DATAERR


class DiskError(JobStopped):
    """Writing a part, the output or the summary failed; names the path and the cause."""

    exit_code = 74  # EX_IOERR

    def __init__(self, exc: OSError, *, path: Path | str, what: str) -> None:
        self.path = path
        self.errno = exc.errno
        cause = exc.strerror or str(exc)
        if exc.errno is not None and exc.errno in errno.errorcode:
            cause += f" ({errno.errorcode[exc.errno]})"
        super().__init__(
            f"{path}: cannot write {what}: {cause}; every part already on disk is kept: "
            "free space (or fix the disk) and rerun the same command to finish the job"
        )


class TransientStop(PromptmillError):
    """The job did not run for a reason that passes: run the same command again a little later."""

    exit_code = 75


class OutputBusy(TransientStop):
    """Another run holds the output's lock (an earlier attempt still draining, say)."""

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class RequestError(PromptmillError):
    """One request failed. ``row_id`` is set by the runner once it is known."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        row_id: str | None = None,
    ) -> None:
        self.message = message
        self.http_status = http_status
        self.code = code
        self.headers: Mapping[str, str] = headers or {}
        self.row_id = row_id
        self.attempts: int | None = None  # set by the retry policy when it gives up
        super().__init__(message)


class APIStatusError(RequestError):
    """The server answered with a non-2xx status; ``code`` is its error code if it sent one."""


class APIConnectionError(RequestError):
    """The request never got a complete answer: connect error, timeout, dropped connection."""


class ResponseError(RequestError):
    """A 2xx answer that cannot be used: unparseable, wrong shape, or a stream cut off."""


class BadValueError(ResponseError):
    """A 2xx answer holding a value no output column can hold; retrying would pay for it again."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("code", "bad_response")
        super().__init__(message, **kw)  # type: ignore[arg-type]


class InvalidOutputError(ResponseError):
    """A 2xx answer that is not JSON or does not follow the job's schema (``[output] schema``).

    Retried with the same request up to ``output.parse_attempts`` times; ``final`` is set on
    the one past them, which fails the row. ``pointer`` says where the answer breaks the
    schema, ``raw`` is the answer's text, ``reply`` the paid answer it came in.
    """

    def __init__(self, message: str, *, pointer: str, raw: str | None, reply: object, final: bool,
                 kind: str = "breaks the schema") -> None:
        super().__init__(message, code="invalid_output")
        self.pointer = pointer
        self.kind = kind  # "no text", "not JSON" or "breaks the schema": re-asks are logged once per kind
        self.raw = raw
        self.reply = reply
        self.final = final
