"""Test helpers: run the CLI in-process, write inputs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.cli import main


@dataclass
class CliRun:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> CliRun:
    """Run ``promptmill`` in this process, as a user would from a shell."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    finally:
        logging.getLogger().handlers[:] = [
            h for h in logging.getLogger().handlers if not getattr(h, "promptmill", False)
        ]
    captured = capsys.readouterr()
    return CliRun(code, captured.out, captured.err)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[Mapping[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


def prompts(n: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"p{i:04d}", "prompt": f"Tell me fact number {i} about the sea", "topic": f"t{i % 3}"}
        for i in range(start, start + n)
    ]


#: The smallest job file: an input, an output, a base URL and a model.
MINIMAL_JOB = """\
[input]
path = "in.jsonl"

[output]
path = "out.parquet"

[api]
base_url = "http://127.0.0.1:8089/v1"

[request]
model = "m"
"""


def sim_job(tmp_path: Path, base_url: str, rows: Iterable[Mapping[str, Any]], rest: str) -> Path:
    """A job file on ``base_url`` (a simulator) over ``rows``, model ``sim-small`` with 16 tokens,
    then ``rest`` (more tables: limits, prices, a sweep)."""
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "{inp}"
[output]
path = "{tmp_path / 'out.parquet'}"
[api]
base_url = "{base_url}"
[request]
model = "sim-small"
max_tokens = 16
{rest}""")
    return job
