"""promptmill: run large batches of LLM completions against an OpenAI-compatible API."""

from __future__ import annotations

__version__ = "0.1.0"
