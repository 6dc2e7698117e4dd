"""promptmill: run large batches of LLM completions against an OpenAI-compatible API.

The package face: load a job spec, run it, read its summary. Each stage lives in
its own module (see the design): ``spec``, ``reader``, ``prompts``, ``limiter``,
``client``, ``retry``, ``records``, ``writer``, ``pricing``, ``summary``,
``runner``, ``cli`` and ``simulator``; ``api`` is the Python API (``run``, ``complete``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# The package face is loaded on first use, so ``promptmill --help`` or ``simulate``
# and a library user who needs one module do not pay for Arrow and httpx.
_EXPORTS = {
    **dict.fromkeys(
        ("APIConnectionError", "APIStatusError", "InputError", "JobFileError", "JobStopped", "OutputError",
         "PromptmillError", "RequestError", "ResponseError", "UsageError"),
        "batch.errors",
    ),
    **dict.fromkeys(("Completion", "Request", "Result", "Row", "Usage"), "batch.records"),
    **dict.fromkeys(("RunOptions", "run_job"), "batch.runner"),
    **dict.fromkeys(("JobSpec", "load_job"), "batch.spec"),
    **dict.fromkeys(("acomplete", "arun", "complete", "run"), "batch.api"),
    "Summary": "batch.summary",
}

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "Completion",
    "InputError",
    "JobFileError",
    "JobSpec",
    "JobStopped",
    "OutputError",
    "PromptmillError",
    "Request",
    "RequestError",
    "ResponseError",
    "Result",
    "Row",
    "RunOptions",
    "Summary",
    "Usage",
    "UsageError",
    "acomplete",
    "arun",
    "complete",
    "load_job",
    "run",
    "run_job",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from batch.api import acomplete, arun, complete, run
    from batch.errors import (
        APIConnectionError,
        APIStatusError,
        InputError,
        JobFileError,
        JobStopped,
        OutputError,
        PromptmillError,
        RequestError,
        ResponseError,
        UsageError,
    )
    from batch.records import Completion, Request, Result, Row, Usage
    from batch.runner import RunOptions, run_job
    from batch.spec import JobSpec, load_job
    from batch.summary import Summary
