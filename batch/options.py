"""The options of ``promptmill run`` and the job-file keys they set: one table for the command and
the Python API (``batch.run(..., concurrency=64)``). A leaf: imported by the command before anything heavy."""

from __future__ import annotations

__all__ = ["OPTION_KEYS"]

# option names as ``promptmill run`` spells them (underscored), and the job keys they set
OPTION_KEYS: dict[str, str] = {
    "input": "input.path",
    "output": "output.path",
    "base_url": "api.base_url",
    "model": "request.model",
    "endpoint": "api.endpoint",
    "stream": "api.stream",
    "max_tokens": "request.max_tokens",
    "concurrency": "limits.concurrency",
    "rpm": "limits.rpm",
    "tpm": "limits.tpm",
    "max_attempts": "retry.max_attempts",
    "api_key_env": "api.api_key_env",
    "allow_insecure_http": "api.allow_insecure_http",
    "input_format": "input.format",
    "output_format": "output.format",
    "error_file": "output.error_file",
    "embed_batch": "input.embed_batch",
    "budget_usd": "limits.budget_usd",
    "budget_per_variant": "limits.budget_per_variant",
    "engine": "engine.kind",
    "ray_address": "engine.address",
}
