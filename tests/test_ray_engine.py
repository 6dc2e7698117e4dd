"""The Ray engine end to end: ``promptmill run --engine ray`` on a local Ray against the simulator.

Each test runs the command in a subprocess (as a user would; the driver starts
a local Ray of its own and shuts it down) with 4 worker actors. Skipped where
ray is not installed (``pip install -e '.[ray]'``); CI installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from batch.store import parts_dir
from tests.helpers import prompts, write_jsonl, write_parquet

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the [ray] extra is not installed")

SECRET = "sk-ray-engine-0123456789abcdef"
WORKERS = 4


def job_file(tmp_path: Path, sim: SimServer, rows: int, *, rpm: float | None = None, concurrency: int = 32,
             ray_table: bool = True, jsonl: bool = False) -> Path:
    if jsonl:
        inp = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    else:
        inp = write_parquet(tmp_path / "in.parquet", prompts(rows))
    limits = f"rpm = {rpm}\n" if rpm is not None else ""
    engine = f'[engine]\nkind = "ray"\nworkers = {WORKERS}\ncpus_per_worker = 0.5\n' if ray_table else ""
    path = tmp_path / "job.toml"
    path.write_text(
        f'[input]\npath = "{inp}"\n'
        f'[output]\npath = "{tmp_path / "out" / "res.parquet"}"\n'
        f'[api]\nbase_url = "{sim.base_url}"\nread_timeout_s = 0.5\nrequest_timeout_s = 3\n'
        '[request]\nmodel = "simulator-small"\nmax_tokens = 16\n'
        f"[limits]\nconcurrency = {concurrency}\n{limits}"
        "[retry]\nmax_attempts = 10\ninitial_wait_s = 0.01\nmax_wait_s = 0.05\n"
        f"{engine}"
    )
    return path


def promptmill(*args: str | Path, key: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if key is not None:
        env["ATOMA_API_KEY"] = key
    return subprocess.Popen([sys.executable, "-m", "batch", "run", *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=200)
    return proc.returncode, out, err


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out" / "res.parquet").to_pylist()


def assert_every_row_once_and_ok(tmp_path: Path, rows: int) -> None:
    got = output_rows(tmp_path)
    ids = Counter(r["id"] for r in got)
    assert sorted(ids) == [p["id"] for p in prompts(rows)]
    assert max(ids.values()) == 1, "a row was written twice"
    assert Counter(r["status"] for r in got) == {"ok": rows}


@needs_ray
def test_four_workers_answer_every_row_once_with_the_key_from_the_environment(
        sim: SimServer, tmp_path: Path) -> None:
    sim.configure(api_key=SECRET)  # the workers must have the key, which reaches them through Ray
    job = job_file(tmp_path, sim, 2000, ray_table=False)
    code, out, err = finished(promptmill(job, "--engine", "ray", key=SECRET))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, 2000)
    assert sim.stats["requests"] == 2000
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    assert summary["rows_ok"] == 2000 and summary["rows_failed"] == 0
    assert "2,000 ok, 0 failed" in out
    assert "Traceback" not in err
    # the key is in no log line, output, metadata or summary
    assert SECRET not in out + err
    assert SECRET.encode() not in (tmp_path / "out" / "res.parquet").read_bytes()
    assert SECRET not in (tmp_path / "out" / "res.parquet.summary.json").read_text()
    assert not parts_dir(tmp_path / "out" / "res.parquet").exists()


@needs_ray
def test_the_cluster_keeps_to_the_rate_limit_it_is_told(sim: SimServer, tmp_path: Path) -> None:
    # the server allows 60 requests in any 2 s (1,800 a minute); the job is told 1,800 rpm
    sim.configure(rpm=60, window_s=2.0)
    job = job_file(tmp_path, sim, 300, rpm=1800)
    code, _, err = finished(promptmill(job))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, 300)
    assert sim.stats["rate_limited"] == 0
    assert sim.stats["requests"] == 300


@needs_ray
def test_every_row_ends_ok_with_a_fifth_of_requests_failing(sim: SimServer, tmp_path: Path) -> None:
    sim.configure(fault_rate=0.2, hang_s=1.0)
    job = job_file(tmp_path, sim, 1000, jsonl=True)  # read_json this time
    code, _, err = finished(promptmill(job))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, 1000)
    assert sum(sim.stats["by_fault"].values()) > 100  # the faults happened, and were retried


@needs_ray
def test_a_killed_driver_rerun_writes_every_row_once(sim: SimServer, tmp_path: Path) -> None:
    sim.configure(latency_ms=50)
    rows = 1000
    job = job_file(tmp_path, sim, rows, concurrency=16)
    proc = promptmill(job)
    parts = parts_dir(tmp_path / "out" / "res.parquet")
    deadline = time.monotonic() + 120
    while not any(parts.glob("run-*-part-*.arrow")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # Ray ends the dead driver's workers a moment later: count what the killed run sent once they are gone
    sent_first = -1
    while sim.stats["requests"] != sent_first and time.monotonic() < deadline:
        sent_first = sim.stats["requests"]
        time.sleep(1.0)
    assert 0 < sent_first < rows

    code, _, err = finished(promptmill(job))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, rows)
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    assert summary["rows_skipped"] > 0  # the parts of the killed run were kept and skipped
    # re-sent: at most what each worker had in flight or not yet in a part (a block of 4 x 16 rows)
    assert sim.stats["requests"] - rows <= WORKERS * 64


@needs_ray
def test_a_fatal_answer_stops_every_worker_with_exit_3(sim: SimServer, tmp_path: Path) -> None:
    sim.configure(api_key=SECRET, fatal_status=401, fatal_after=100)
    job = job_file(tmp_path, sim, 2000)
    code, _, err = finished(promptmill(job, key=SECRET))
    assert code == 3, err
    assert "the API key was refused (401)" in err
    assert "Traceback" not in err and SECRET not in err
    # every worker stopped: far fewer requests than rows, none of the 401s written as rows
    assert sim.stats["requests"] < 400
    got = output_rows(tmp_path)
    assert len(got) <= 100 and {r["status"] for r in got} == {"ok"}


@pytest.mark.parametrize(("extra", "refused"), [
    ('[sweep]\nsamples = 2\n', "sweeps (several variants, samples or scores)"),
    ("", "budgets (limits.budget_usd)"),
])
def test_what_the_ray_engine_does_not_run_yet_is_refused_in_one_line(
        sim: SimServer, tmp_path: Path, extra: str, refused: str) -> None:
    job = job_file(tmp_path, sim, 10)
    job.write_text(job.read_text() + extra)
    args = [] if extra else ["--budget-usd", "1"]
    code, _, err = finished(promptmill(job, *args))
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"promptmill: the Ray engine does not support {refused} yet; run this job with --engine local")
    assert sim.stats["requests"] == 0 and not (tmp_path / "out" / "res.parquet").exists()
