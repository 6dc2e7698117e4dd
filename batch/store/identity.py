"""Which job writes an output: recorded in the parts folder as it runs, and in the output's metadata after."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import DiskError
from batch.store.atomic import atomic_write
from batch.store.parts import parts_dir
from batch.store.schema import METADATA_KEY

__all__ = ["read_job_identity", "write_job_identity"]


def write_job_identity(output: Path, identity: Mapping[str, Any]) -> None:
    folder = parts_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "job.json"
    try:
        atomic_write(target, json.dumps(dict(identity), sort_keys=True, indent=2).encode())
    except OSError as exc:
        raise DiskError(exc, path=target, what="the job's identity") from None


def read_job_identity(output: Path) -> dict[str, Any] | None:
    """The identity recorded by the run that last wrote this output (parts first, then the file)."""
    job_file = parts_dir(output) / "job.json"
    if job_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(job_file.read_text())
            if isinstance(data, dict):
                return data
    if output.is_file():
        try:
            meta = pq.read_schema(output).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return None
        raw = meta.get(METADATA_KEY)
        if raw:
            with contextlib.suppress(ValueError):
                data = json.loads(raw)
                if isinstance(data, dict) and isinstance(data.get("identity"), dict):
                    return dict(data["identity"])
    return None
