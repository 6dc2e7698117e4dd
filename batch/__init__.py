"""promptmill: run large batches of LLM completions against an OpenAI-compatible API.

The package face: load a job spec, run it, read its summary. Each stage lives in
its own module; the README's "How the code is laid out" lists them in pipeline order.
``batch.api`` is the Python API (``run``, ``complete`` and their async twins).
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

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


# The face loads a name's module on first use, not at import: loading them all
# would add Arrow, httpx and anyio to every `promptmill --help`, `simulate` and
# `import batch.errors` (the cost is in the README, Performance). The modules
# that hold the names of __all__, cheapest first:
_HOMES = ("batch.errors", "batch.records", "batch.spec", "batch.spec_load", "batch.summary", "batch.runner",
          "batch.api")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _HOMES:
            module = importlib.import_module(home)
            if name in module.__all__:
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module 'batch' has no attribute {name!r}")


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
    from batch.spec import JobSpec
    from batch.spec_load import load_job
    from batch.summary import Summary
