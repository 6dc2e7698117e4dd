"""The Ray engine end to end: ``promptmill run --engine ray`` on a local Ray against the simulator.

Each test runs the command in a subprocess (as a user would; the driver starts
a local Ray of its own and shuts it down) with 4 worker actors. Skipped where
ray is not installed (``pip install -e '.[ray]'``); CI installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
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


def started_until(job: Path, ready: Callable[[], bool]) -> subprocess.Popen[str]:
    """The job started, once ``ready()`` (it is still running: the test may kill it or a worker)."""
    proc = promptmill(job)
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    return proc


def running(sim: SimServer, tmp_path: Path, rows: int, *, latency_ms: int, sent: int) -> tuple[Path, subprocess.Popen[str]]:
    """A job of ``rows`` (answers after ``latency_ms``, concurrency 16), running, ``sent`` requests in."""
    sim.configure(latency_ms=latency_ms)
    job = job_file(tmp_path, sim, rows, concurrency=16)
    return job, started_until(job, lambda: sim.stats["requests"] >= sent)


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
    sim.configure(api_key=SECRET, latency_ms=40)  # the workers must have the key, which reaches them through Ray
    job = job_file(tmp_path, sim, 5000, ray_table=False)
    code, out, err = finished(promptmill(job, "--engine", "ray", key=SECRET))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, 5000)
    assert sim.stats["requests"] == 5000
    # the job's concurrency (32) is shared by the workers: all of it in use, never more
    assert 24 <= sim.stats["max_in_flight"] <= 32, sim.stats["max_in_flight"]
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    assert summary["rows_ok"] == 5000 and summary["rows_failed"] == 0
    assert "5,000 ok, 0 failed" in out
    # the progress the driver shows is every worker's, gathered by the limiter actor
    line = next(x for x in err.splitlines() if "progress: " in x)
    assert "progress: 5,000/5,000 rows, 0 failed" in line and " tokens/s" in line
    assert f"${summary['totals']['cost_usd']:.4f} spent" in line, line
    assert "Traceback" not in err
    # the key is in no log line, output, metadata or summary
    assert SECRET not in out + err
    assert SECRET.encode() not in (tmp_path / "out" / "res.parquet").read_bytes()
    assert SECRET not in (tmp_path / "out" / "res.parquet.summary.json").read_text()
    assert not parts_dir(tmp_path / "out" / "res.parquet").exists()


@needs_ray
def test_the_cluster_keeps_to_the_rate_limit_it_is_told_and_uses_it(sim: SimServer, tmp_path: Path) -> None:
    # the server allows 300 requests in any 10 s (1,800 a minute); the job is told 1,800 rpm
    sim.configure(rpm=300, window_s=10.0)
    rows = 450
    job = job_file(tmp_path, sim, rows, rpm=1800)
    code, _, err = finished(promptmill(job))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, rows)
    assert sim.stats["rate_limited"] == 0
    assert sim.stats["requests"] == rows
    # across the four workers, at least 0.9 of the limit: from the first answer to the last
    times = sorted(r["finished_at"].timestamp() for r in output_rows(tmp_path))
    achieved = (rows - 1) / (times[-1] - times[0])
    assert achieved >= 0.9 * 1800 / 60, f"{achieved:.1f} requests/s"


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
    parts = parts_dir(tmp_path / "out" / "res.parquet")
    proc = started_until(job, lambda: any(parts.glob("run-*-part-*.arrow")))
    deadline = time.monotonic() + 120
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


@needs_ray
def test_sigterm_lets_the_workers_finish_what_they_sent_and_keeps_every_paid_answer(
        sim: SimServer, tmp_path: Path) -> None:
    rows = 1500
    job, proc = running(sim, tmp_path, rows, latency_ms=100, sent=200)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finished(proc)
    assert code == 143, err
    assert "SIGTERM: the workers send nothing more and finish their requests in flight" in err
    assert "stopped early: SIGTERM received" in out
    got = output_rows(tmp_path)
    assert 0 < len(got) < rows and {r["status"] for r in got} == {"ok"}
    # every request sent was answered, recorded and counted: none paid and lost
    assert sim.stats["requests"] == len(got)
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    assert summary["rows_ok"] == len(got) and summary["stopped"] == "SIGTERM received"
    code, _, err = finished(promptmill(job))
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, rows)
    assert sim.stats["requests"] == rows  # the rerun sent only what the first run had not


@needs_ray
def test_an_input_changed_while_the_job_runs_stops_every_worker_with_exit_65(sim: SimServer, tmp_path: Path) -> None:
    rows = 1500
    _, proc = running(sim, tmp_path, rows, latency_ms=100, sent=200)
    inp = tmp_path / "in.parquet"
    os.utime(inp, ns=(inp.stat().st_atime_ns, inp.stat().st_mtime_ns + 10**9))  # rewritten, as far as it can tell
    code, _, err = finished(proc)
    assert code == 65, err
    assert f"{inp}: the input changed while the job ran (modified since the job started): stopping" in err
    got = output_rows(tmp_path)
    assert 0 < len(got) < rows and max(Counter(r["id"] for r in got).values()) == 1
    assert {r["status"] for r in got} == {"ok"}


@needs_ray
def test_a_killed_worker_process_loses_nothing_and_writes_no_row_twice(sim: SimServer, tmp_path: Path) -> None:
    rows = 3000
    _, proc = running(sim, tmp_path, rows, latency_ms=40, sent=600)
    workers = block_workers()
    assert len(workers) == WORKERS, workers
    os.kill(workers[0], signal.SIGKILL)  # mid-block: Ray restarts the actor and hands its block out again
    code, _, err = finished(proc)
    assert code == 0, err
    assert_every_row_once_and_ok(tmp_path, rows)
    # sent again: at most what the killed worker had in hand (one block of 4 x 16 rows)
    assert sim.stats["requests"] - rows <= 64, sim.stats["requests"]


def block_workers() -> list[int]:
    """The processes of the job's worker actors (Ray names them after the callable class)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"MapBatches(BlockWorker)" in cmdline and proc.name.isdigit():
            found.append(int(proc.name))
    return found


@needs_ray
def test_a_sweep_runs_on_ray_with_every_id_variant_sample_once_and_scored(sim: SimServer, tmp_path: Path) -> None:
    n = 100
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i:03d}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                              for i in range(n)])
    job = tmp_path / "job.toml"
    job.write_text(
        f'[input]\npath = "{inp}"\n[output]\npath = "{tmp_path / "out" / "res.parquet"}"\n'
        f'[api]\nbase_url = "{sim.base_url}"\n[request]\nmodel = "sim-small"\nmax_tokens = 16\n'
        '[limits]\nconcurrency = 16\n[engine]\nkind = "ray"\nworkers = 4\ncpus_per_worker = 0.5\n'
        '[sweep]\nsamples = 2\n[sweep.grid]\nmodel = ["sim-small", "sim-large"]\ntemperature = [0.0, 0.7]\n'
        '[[sweep.score]]\nname = "correct"\nkind = "number"\nreference = "answer"\n'
    )
    code, out, err = finished(promptmill(job))
    assert code == 0, err
    got = output_rows(tmp_path)
    keys = Counter((r["id"], r["variant"], r["sample"]) for r in got)
    assert len(keys) == n * 4 * 2 and max(keys.values()) == 1
    bad = [r for r in got if r["status"] != "ok" or r["model"] != r["variant"].split(",")[0].removeprefix("model=")]
    assert not bad, bad[:3]
    assert all(r["score_correct"] == (1.0 if r["text"] == f"The answer is {r['answer']}." else 0.0) for r in got)
    assert Counter(b["model"] for b in sim.stats["params_seen"]) == {"sim-small": 400, "sim-large": 400}
    # the same per-variant summary as on one machine: every variant with its score
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    variants = {v["name"]: v for v in summary["variants"]}
    assert len(variants) == 4 and all(v["this_run"]["rows_ok"] == 200 for v in variants.values())
    assert "model=sim-large,temperature=0.0" in out and "correct" in out


@needs_ray
def test_a_budget_holds_across_the_workers_and_a_rerun_sends_nothing(sim: SimServer, tmp_path: Path) -> None:
    rows = 2000
    job = job_file(tmp_path, sim, rows)
    full = 0.1 * 2000 * 20 / 1e6  # under half of what the rows cost at simulator-small's example price
    code, out, err = finished(promptmill(job, "--budget-usd", f"{full:.6f}"))
    assert code == 4, err
    assert "budget reached" in err and "budget reached" in out and "Traceback" not in err
    got = output_rows(tmp_path)
    spent = sum(r["cost_usd"] for r in got)
    assert 0 < len(got) < rows and spent <= full
    assert max(Counter(r["id"] for r in got).values()) == 1 and {r["status"] for r in got} == {"ok"}
    summary = json.loads((tmp_path / "out" / "res.parquet.summary.json").read_text())
    assert summary["budget"]["reached"] and abs(summary["budget"]["spent_usd"] - spent) < 1e-9
    sent = sim.stats["requests"]
    assert sent == len(got)  # nothing was sent that did not fit
    code, _, err = finished(promptmill(job, "--budget-usd", f"{full:.6f}"))
    assert code == 4, err
    assert sim.stats["requests"] == sent  # the same budget again: the output has spent it


@needs_ray
def test_a_running_cluster_is_joined_with_ray_address(sim: SimServer, tmp_path: Path) -> None:
    # a cluster of one node, as `ray start --head` makes it (token authentication on), on loopback
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="pm-ray-")  # short: Ray's socket paths live in it
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "3", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        job = job_file(tmp_path, sim, 500)
        code, out, err = finished(promptmill(job, "--ray-address", f"127.0.0.1:{port}"))
        assert code == 0, err
        assert_every_row_once_and_ok(tmp_path, 500)
        assert "500 ok, 0 failed" in out
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and every process it started, and no other Ray
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_ray
def test_an_input_without_an_id_column_is_refused_in_one_line(sim: SimServer, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    job = job_file(tmp_path, sim, 1)
    job.write_text(job.read_text().replace(str(tmp_path / "in.parquet"), str(inp)))
    code, _, err = finished(promptmill(job))
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("promptmill: the Ray engine needs an id column in the input")
    assert sim.stats["requests"] == 0 and not (tmp_path / "out" / "res.parquet").exists()


@needs_ray
def test_structured_output_on_ray_has_the_local_engines_columns_and_re_asks(sim: SimServer, tmp_path: Path) -> None:
    sim.configure(invalid_output_rate=0.2)
    schema = Path(__file__).parents[1] / "jobs" / "schemas" / "qa.json"
    outputs = {}
    for engine in ("local", "ray"):
        job = job_file(tmp_path, sim, 300, concurrency=16)
        job.write_text(job.read_text().replace("[output]\n", f'[output]\nschema_file = "{schema}"\nparse_attempts = 4\n')
                       .replace('kind = "ray"', f'kind = "{engine}"').replace("max_tokens = 16", "max_tokens = 256")
                       .replace(str(tmp_path / "out" / "res.parquet"), str(tmp_path / engine / "res.parquet")))
        code, out, err = finished(promptmill(job))
        assert code == 0, err
        outputs[engine] = pq.read_table(tmp_path / engine / "res.parquet")
        assert "rows asked again" in out
    local, ray = outputs["local"], outputs["ray"]
    assert ray.schema.remove_metadata() == local.schema.remove_metadata()
    rows = ray.to_pylist()
    assert sorted(r["id"] for r in rows) == [p["id"] for p in prompts(300)]
    assert all(r["status"] == "ok" and r["parsed"]["question"] for r in rows)
    assert any(r["invalid_answers"] > 0 for r in rows)  # answers that broke the schema were asked again


@needs_ray
def test_openai_batch_files_on_ray_keep_their_parquet_store_and_resume(sim: SimServer, tmp_path: Path) -> None:
    requests = Path(__file__).parents[1] / "sample_data" / "batch_requests.jsonl"
    args = ["--input", requests, "--output", tmp_path / "results.jsonl", "--output-format", "openai_batch",
            "--base-url", sim.base_url, "--model", "simulator-small", "--engine", "ray"]
    code, _, err = finished(promptmill(*args))
    assert code == 0, err
    asked = [json.loads(line)["custom_id"] for line in requests.read_text().splitlines() if line.strip()]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(asked)
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert pq.read_table(tmp_path / "results.parquet").num_rows == len(asked)  # the durable store, beside it
    sent = sim.stats["requests"]
    code, _, err = finished(promptmill(*args))
    assert code == 0, err
    assert sim.stats["requests"] == sent  # the rerun resumed from the store: nothing sent again
