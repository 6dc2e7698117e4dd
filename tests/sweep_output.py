"""A small sweep-shaped promptmill output, written with pyarrow directly, for the report tests.

Three variants (the baseline ``small-t0``, ``small-t7`` and ``large-t0``) x 5 ids x
2 samples: 30 rows, two of them failed, with a pass/fail score (``exact``) and a
numeric one (``quality``). The rows are returned too, so a test computes what the
report should say from the same values.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.simulator import SimServer
from tests.helpers import sim_job

VARIANTS = {
    "small-t0": {"model": "sim-small", "temperature": 0.0},
    "small-t7": {"model": "sim-small", "temperature": 0.7},
    "large-t0": {"model": "sim-large", "temperature": 0.0},
}
BASELINE = "small-t0"
IDS = [f"q{i}" for i in range(5)]
SAMPLES = 2
START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# exact-match score per (variant, id, sample): the large model is right more often
_EXACT = {
    "small-t0": [1, 1, 0, 0, 1, 1, 0, 0, 1, 0],
    "small-t7": [1, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    "large-t0": [1, 1, 1, 1, 1, 1, 0, 1, 1, 1],
}
# (variant, id, sample) of the rows that failed, and why
FAILED = {("small-t7", "q3", 1): ("TOO_MANY_REQUESTS", 429), ("large-t0", "q4", 0): ("ReadTimeout", None)}


def sweep_rows() -> list[dict[str, Any]]:
    rows = []
    n = 0
    for v_index, (name, params) in enumerate(VARIANTS.items()):
        large = params["model"] == "sim-large"
        for i, row_id in enumerate(IDS):
            for sample in range(SAMPLES):
                n += 1
                failure = FAILED.get((name, row_id, sample))
                completion = 20 + 3 * i + 5 * sample + (30 if large else 0) + 2 * v_index
                prompt = 12 + i
                ok = failure is None
                rows.append({
                    "id": row_id,
                    "topic": f"t{i % 2}",
                    "model": params["model"],
                    "endpoint": "chat",
                    "status": "ok" if ok else "failed",
                    "text": f"answer {row_id} {sample}" if ok else None,
                    "refusal": None,
                    "finish_reason": "stop" if ok else None,
                    "prompt_tokens": prompt if ok else None,
                    "completion_tokens": completion if ok else None,
                    "total_tokens": prompt + completion if ok else None,
                    "cached_tokens": 0 if ok else None,
                    "reasoning_tokens": 0 if ok else None,
                    # $1 / M in, $2 / M out for the small model; ten times that for the large one
                    "cost_usd": (prompt * 1e-6 + completion * 2e-6) * (10 if large else 1) if ok else None,
                    "latency_s": 0.2 + 0.05 * i + 0.01 * sample + (0.5 if large else 0.0) if ok else None,
                    "ttft_s": 0.05 + 0.01 * i + (0.1 if large else 0.0) if ok else None,
                    "attempts": 1 if ok else 5,
                    "http_status": 200 if ok else (failure[1] if failure else None),
                    "error_code": None if ok else failure[0] if failure else None,
                    "error": None if ok else "gave up",
                    "response_id": f"r{n}" if ok else None,
                    "created": START + timedelta(seconds=n) if ok else None,
                    "system_fingerprint": None,
                    "request_fingerprint": f"{n:064x}",
                    "variant": name,
                    "sample": sample,
                    "params": json.dumps(params),
                    "score_exact": float(_EXACT[name][2 * i + sample]) if ok else None,
                    "score_quality": round(0.5 + 0.04 * i + 0.03 * sample + (0.2 if large else 0.0), 4) if ok else None,
                    "finished_at": START + timedelta(seconds=n, milliseconds=500),
                })
    return rows


_SCHEMA = pa.schema([
    ("id", pa.string()), ("topic", pa.string()), ("model", pa.string()), ("endpoint", pa.string()),
    ("status", pa.string()), ("text", pa.string()), ("refusal", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
    ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()), ("cost_usd", pa.float64()),
    ("latency_s", pa.float64()), ("ttft_s", pa.float64()), ("attempts", pa.int32()), ("http_status", pa.int32()),
    ("error_code", pa.string()), ("error", pa.string()), ("response_id", pa.string()),
    ("created", pa.timestamp("us", tz="UTC")), ("system_fingerprint", pa.string()),
    ("request_fingerprint", pa.string()), ("variant", pa.string()), ("sample", pa.int32()), ("params", pa.string()),
    ("score_exact", pa.float64()), ("score_quality", pa.float64()), ("finished_at", pa.timestamp("us", tz="UTC")),
])


def job_metadata(*, sweep: bool = True, baseline: str = BASELINE) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "identity": {"job": "report-test", "input": "/data/questions.jsonl", "id_column": "id"},
        "settings": {"api": {"base_url": "simulator", "endpoint": "chat"}, "job": {"name": "report-test"}},
        "promptmill": "0.1.0",
    }
    if sweep:
        doc["variants"] = [{"name": k, "params": v} for k, v in VARIANTS.items()]
        doc["baseline"] = baseline
    return doc


def write_sweep_output(path: Path, rows: list[dict[str, Any]] | None = None, *,
                       drop: tuple[str, ...] = (), sweep_metadata: bool = True,
                       baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Write the output (without the columns in ``drop``) and return its rows."""
    rows = sweep_rows() if rows is None else rows
    schema = pa.schema([f for f in _SCHEMA if f.name not in drop and not (f.name.startswith("score_") and "score_*" in drop)],
                       metadata={b"promptmill.job": json.dumps(job_metadata(sweep=sweep_metadata, baseline=baseline)).encode()})
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k in schema.names} for r in rows], schema), path)
    return rows


# --- a sweep job on the simulator ---------------------------------------------------

ROWS = [{"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?", "answer": 3 * i} for i in range(5)]


def sweep_job(tmp_path: Path, sim: SimServer, extra_variant: str = "") -> Path:
    """A 2 models x 2 temperatures x 3 samples sweep over ROWS on the simulator, scored; ``extra_variant`` is appended."""
    return sim_job(tmp_path, sim.base_url, ROWS, f"""[sweep]
samples = 3
[sweep.grid]
model = ["sim-small", "sim-large"]
temperature = [0.0, 0.7]
[[sweep.score]]
name = "correct"
kind = "number"
reference = "answer"
{extra_variant}
""")
