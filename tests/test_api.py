"""The Python API: batch.run / arun and batch.complete / acomplete, end to end against the simulator."""

from __future__ import annotations

import asyncio
import signal
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch
from batch.errors import JobStopped
from batch.simulator import SimServer
from tests.helpers import prompts, write_jsonl


def hundred_rows() -> pa.Table:
    return pa.table({"id": [f"r{i:03d}" for i in range(100)], "text": [f"the sea, fact {i}" for i in range(100)]})


def test_complete_a_100_row_table_with_a_template(sim: SimServer) -> None:
    table = batch.complete(hundred_rows(), model="simulator-small", base_url=sim.base_url,
                           template="Summarise: {text}", max_tokens=16, temperature=0.2)
    assert table.num_rows == 100
    assert sorted(table["id"].to_pylist()) == [f"r{i:03d}" for i in range(100)]
    assert set(table["status"].to_pylist()) == {"ok"}
    assert all(table["text"].to_pylist()) and pa.compute.sum(table["cost_usd"]).as_py() > 0
    assert sim.stats["requests"] == 100


async def test_acomplete_inside_a_running_event_loop(sim: SimServer) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    rows = [{"prompt": f"question {i}"} for i in range(100)]  # a list of dicts, numbered from 0
    table = await batch.acomplete(rows, model="simulator-small", base_url=sim.base_url, max_tokens=8)
    assert sorted(table["id"].to_pylist(), key=int) == [str(i) for i in range(100)]
    assert set(table["status"].to_pylist()) == {"ok"}
    assert signal.getsignal(signal.SIGTERM) is handler  # no signal handler installed in the caller's process


async def test_the_sync_call_works_inside_a_running_loop_too(sim: SimServer) -> None:
    asyncio.get_running_loop()  # as in a Jupyter cell: run in a worker thread, waited for
    table = batch.complete([{"prompt": "hello"}], model="simulator-small", base_url=sim.base_url, max_tokens=8)
    assert table["status"].to_pylist() == ["ok"]


def test_complete_with_an_output_resumes_and_sends_nothing_twice(sim: SimServer, tmp_path: Path) -> None:
    out = tmp_path / "kept.parquet"
    first = batch.complete(hundred_rows(), model="simulator-small", base_url="simulator",
                           template="Summarise: {text}", output=out, max_tokens=8)
    assert first.num_rows == 100 and pq.read_table(out).num_rows == 100
    again = batch.complete(hundred_rows(), model="simulator-small", base_url=sim.base_url,
                           template="Summarise: {text}", output=out, max_tokens=8)
    assert sorted(again["id"].to_pylist()) == sorted(first["id"].to_pylist())
    assert sim.stats["requests"] == 0  # the first call ran on its own built-in simulator; this one sent nothing


def test_run_a_job_file_with_overrides_and_a_date(sim: SimServer, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    summary = batch.run(None, input=inp, output=str(tmp_path / "{job}-{ds}.parquet"), base_url=sim.base_url,
                        model="simulator-small", concurrency=4, date=date(2024, 6, 30),
                        **{"request.max_tokens": 8, "job.name": "nightly"})
    assert (summary.rows_ok, summary.rows_failed) == (30, 0)
    assert pq.read_table(tmp_path / "nightly-2024-06-30.parquet").num_rows == 30
    with pytest.raises(TypeError, match="unknown option 'concurency'"):
        batch.run(None, concurency=4)


def test_a_fatal_answer_raises_job_stopped_with_the_summary(sim: SimServer, tmp_path: Path) -> None:
    sim.configure(fatal_status=402, fatal_after=3)
    with pytest.raises(JobStopped, match="payment required") as stopped:
        batch.complete([{"prompt": f"q{i}"} for i in range(20)], model="simulator-small",
                       base_url=sim.base_url, max_tokens=8, concurrency=1)
    assert stopped.value.summary is not None and stopped.value.summary.rows_ok == 3


def test_the_api_refuses_the_ray_engine_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(batch.UsageError, match="promptmill run JOB --engine ray"):
        batch.run(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.parquet"),
                  base_url="simulator", model="m", engine="ray")
