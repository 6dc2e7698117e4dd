"""The example DAG under a real Airflow: it succeeds with the summary in XCom, and a killed task resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from conftest import REPO, airflow_env

RUN_DAG = str(Path(__file__).with_name("run_dag.py"))
SECRET = "sk-airflow-connection-secret-4711"


def dag_env(airflow_home: Path, out: Path, **extra: str) -> dict[str, str]:
    conn = json.dumps({"conn_type": "generic", "password": SECRET})
    return airflow_env(airflow_home, PROMPTMILL_NIGHTLY_OUT=str(out), PROMPTMILL_NIGHTLY_CONN="llm",
                       AIRFLOW_CONN_LLM=conn, **extra)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_nightly_dag_succeeds_with_the_summary_in_xcom(airflow_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, RUN_DAG, "2024-06-30"], env=dag_env(airflow_home, out),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    assert result["state"] == "success", done.stdout[-3000:]
    summary = result["xcom"]["return_value"]
    assert (summary["rows_ok"], summary["rows_failed"], summary["exit_code"]) == (50, 0, 0)
    assert summary["totals"]["cost_usd"] > 0
    # keyed by the logical date; every row of the input, once
    output = out / "nightly-2024-06-30.parquet"
    assert summary["output"] == str(output)
    ids = pq.read_table(output, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 50
    # the day's report, written by the task after it from the output it named
    report = Path(str(output) + ".report.md").read_text()
    assert "| variant |" in report.lower() or "variant" in report.lower()
    assert "50" in report  # the rows of the run
    # the connection's password reached the job's environment only

    assert SECRET not in done.stdout + done.stderr
    assert "--api-key-env PROMPTMILL_API_KEY" in done.stdout + done.stderr


def test_a_task_killed_mid_run_resumes_and_sends_nothing_twice(airflow_home: Path, tmp_path: Path) -> None:
    rows = 300
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i:03d}", "prompt": f"fact {i}", "topic": "sea"}) + "\n"
                           for i in range(rows)))
    job = tmp_path / "slow.toml"
    job.write_text((REPO / "jobs" / "airflow" / "nightly.toml").read_text()
                   .replace("concurrency = 8", "concurrency = 4")
                   .replace("latency_ms = 20", "latency_ms = 100")
                   .replace('path = "out/nightly/{job}-{ds}.parquet"', 'path = "unused.parquet"\nflush_rows = 10\nflush_s = 0.2'))
    out = tmp_path / "out"
    # No retries: the killed try fails the run at once. With the DAG's own (five minutes apart),
    # dag.test() would wait out the retry delay in its loop, then run the retry itself.
    env = dag_env(airflow_home, out, PROMPTMILL_NIGHTLY_JOB=str(job), PROMPTMILL_NIGHTLY_INPUT=str(inp),
                  PROMPTMILL_NIGHTLY_RETRIES="0")
    parts = out / "nightly-2024-07-01.parquet.parts"

    first = subprocess.Popen([sys.executable, RUN_DAG, "2024-07-01"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(parts.glob("run-*-part-*"))):  # some rows are on disk: mid-run
        assert first.poll() is None, first.stdout.read()[-3000:] if first.stdout else ""
        assert time.monotonic() < deadline, "the task wrote nothing in 120 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # as a worker kills a task: Airflow calls on_kill
    try:
        log, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert "sending SIGTERM to promptmill" in log and "stopped early: SIGTERM received" in log, log[-3000:]
    # the child drained and exited 143, which fails the task the retryable way
    assert "AirflowException: promptmill exited 143" in log, log[-3000:]
    assert last_json(log)["state"] == "failed"
    killed = json.loads((out / "nightly-2024-07-01.parquet.summary.json").read_text())
    sent_first = killed["rows_ok"] + killed["rows_failed"]
    assert 0 < sent_first < rows

    again = subprocess.run([sys.executable, RUN_DAG, "2024-07-01"], env=env, capture_output=True,
                           text=True, timeout=300)
    result = last_json(again.stdout)
    assert result["state"] == "success", again.stdout[-3000:]
    summary = result["xcom"]["return_value"]
    # the second try skipped every row the first finished, and sent only the others
    assert summary["rows_skipped"] == sent_first
    assert summary["rows_ok"] + summary["rows_failed"] == rows - sent_first
    ids = pq.read_table(out / "nightly-2024-07-01.parquet", columns=["id"])["id"].to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(rows)]
