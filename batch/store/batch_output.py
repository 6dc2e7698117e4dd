"""The OpenAI batch output file: assembled from the Parquet output at the end, atomically.

With ``output.format = "openai_batch"`` the Parquet output (the durable store, next
to the ``.jsonl``: see :meth:`batch.spec.JobSpec.store_path`) is written first; this
module then writes one JSON line per request in the shape of OpenAI's batch output::

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…",
     "body": {… the answer as the server sent it, usage included …}}, "error": null}
    {"id": "batch_req_…", "custom_id": "…", "response": null, "error": {"code": "…", "message": "…"}}

``id`` is a hash of the custom_id and the request, so a rerun gives a line the same id.
Failed lines go to the error file when there is one, else into the output with the rest.
Both files are written by :func:`~batch.store.atomic.atomic_write`: whole or not at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow.parquet as pq

from batch.errors import DiskError
from batch.store.atomic import atomic_write

__all__ = ["write_batch_output"]

_COLUMNS = ["id", "status", "http_status", "response_body", "request_id", "error_code", "error",
            "request_fingerprint"]


def _line(row: dict[str, Any]) -> bytes:
    custom_id = row["id"]
    line_id = "batch_req_" + hashlib.blake2b(
        f"{custom_id}\0{row['request_fingerprint'] or ''}".encode(), digest_size=12).hexdigest()
    if row["status"] == "ok":
        body = row["response_body"]
        doc: dict[str, Any] = {
            "id": line_id, "custom_id": custom_id,
            "response": {"status_code": row["http_status"] or 200, "request_id": row["request_id"] or line_id,
                         "body": orjson.Fragment(body) if body is not None else None},
            "error": None,
        }
    else:
        doc = {"id": line_id, "custom_id": custom_id, "response": None,
               "error": {"code": row["error_code"] or "failed", "message": row["error"] or ""}}
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


def _write(store: Path, out: BinaryIO, errors: BinaryIO | None) -> tuple[int, int]:
    ok = failed = 0
    for batch in pq.ParquetFile(store).iter_batches(batch_size=8192, columns=_COLUMNS, use_threads=False):
        for row in batch.to_pylist():
            line = _line(row)
            if row["status"] == "ok":
                ok += 1
                out.write(line)
            else:
                failed += 1
                (errors or out).write(line)
    return ok, failed


def write_batch_output(store: Path, output: Path, error_file: Path | None = None) -> tuple[int, int]:
    """Write the batch output (and error) file of the Parquet output ``store``; (lines ok, lines failed)."""
    target = output
    try:
        if error_file is None:
            return atomic_write(output, lambda fh: _write(store, fh, None))
        target = error_file
        return atomic_write(error_file, lambda efh: atomic_write(output, lambda fh: _write(store, fh, efh)))
    except OSError as exc:
        raise DiskError(exc, path=target, what="the batch output file") from None
