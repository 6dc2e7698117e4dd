"""promptmill: run large batches of LLM completions against an OpenAI-compatible API.

The package face: load a job spec, run it, read its summary. Each stage lives in
its own module (see the design): ``spec``, ``reader``, ``prompts``, ``limiter``,
``client``, ``retry``, ``records``, ``writer``, ``pricing``, ``summary``,
``runner``, ``cli`` and ``simulator``.
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports below: modules read it at import time

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
    "load_job",
    "run_job",
]
