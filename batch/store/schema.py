"""The output's columns: ``id``, the pass-through columns, then the result columns promptmill writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

__all__ = ["EXTRA_FIELDS", "METADATA_KEY", "RESULT_FIELDS", "RESULT_NAMES", "output_schema"]

#: The result columns, in output order, after the id and the pass-through columns.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("model", pa.string()),
    pa.field("endpoint", pa.string()),
    pa.field("status", pa.string()),
    pa.field("text", pa.string()),
    pa.field("refusal", pa.string()),  # the model's refusal, when it gave one instead of text
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("ttft_s", pa.float64()),
    pa.field("attempts", pa.int32()),
    pa.field("http_status", pa.int32()),
    pa.field("error_code", pa.string()),
    pa.field("error", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("created", pa.timestamp("us", tz="UTC")),
    pa.field("system_fingerprint", pa.string()),
    # the key a rerun uses to recognise a finished row: a hash of the request body
    pa.field("request_fingerprint", pa.string()),
    # the sweep's columns (a plain job has one variant, named after its model, and sample 0)
    pa.field("variant", pa.string()),
    pa.field("sample", pa.int32()),
    pa.field("params", pa.string()),  # the variant's parameters, JSON text
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),  # when the row was stored
)
RESULT_NAMES = tuple(f.name for f in RESULT_FIELDS)

#: Result columns written only when a job asks for them, after the others: ``embedding``
#: (an embeddings job, or an OpenAI batch file), ``response_body`` and ``request_id``
#: (an ``openai_batch`` output: the answer's JSON body as the server sent it, and its
#: ``x-request-id`` header).
EXTRA_FIELDS: dict[str, pa.Field] = {
    "embedding": pa.field("embedding", pa.list_(pa.float32())),
    "response_body": pa.field("response_body", pa.string()),
    "request_id": pa.field("request_id", pa.string()),
}

#: the key of the job's identity and settings in the output's Parquet metadata
METADATA_KEY = b"promptmill.job"


def output_schema(passthrough: pa.Schema, metadata: Mapping[bytes, bytes] | None = None,
                  extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The output's schema: ``id``, the pass-through columns, the result columns, then ``extra``:
    those of :data:`EXTRA_FIELDS` a job asks for, or a structured job's parsed answer (filled from
    ``Result.columns``)."""
    fields = [pa.field("id", pa.string()), *passthrough, *RESULT_FIELDS, *extra]
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)
