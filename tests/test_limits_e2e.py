"""Retries and fatal answers end to end: the CLI against the simulator's faults and statuses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from batch.simulator import SimConfig, SimServer
from tests.helpers import prompts, run_cli, write_jsonl

MODEL = "simulator-small"
SECRET = "sk-e2e-limits-0123456789abcdef"
RETRY_LINE = re.compile(r"row (\S+): attempt (\d+) failed \((.+?)\), retrying in (\d+\.\d+) s")


def job_file(tmp_path: Path, *, max_attempts: int = 8) -> Path:
    """Short timeouts and waits so that hangs and retries cost milliseconds."""
    path = tmp_path / "job.toml"
    path.write_text(
        "[api]\n"
        "read_timeout_s = 0.3\n"
        "request_timeout_s = 3\n"
        "[retry]\n"
        f"max_attempts = {max_attempts}\n"
        "initial_wait_s = 0.01\n"
        "max_wait_s = 0.05\n"
    )
    return path


def run_job(capsys: pytest.CaptureFixture[str], sim: SimServer, tmp_path: Path, rows: list[dict[str, Any]],
            *extra: str, max_attempts: int = 8) -> tuple[Any, Path]:
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outp = tmp_path / "out" / "res.parquet"
    run = run_cli(capsys, "run", job_file(tmp_path, max_attempts=max_attempts), "--input", inp,
                  "--output", outp, "--base-url", sim.base_url, "--model", MODEL, "--no-progress",
                  "--max-tokens", "16", *extra)
    return run, outp


def rows_by_id(outp: Path) -> dict[str, dict[str, Any]]:
    table = pq.read_table(outp).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {r["id"]: r for r in table}


@pytest.fixture
def keyed(sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> SimServer:
    """The simulator requiring a key, and the key in the job's environment variable."""
    sim.configure(api_key=SECRET)
    monkeypatch.setenv("ATOMA_API_KEY", SECRET)
    return sim


# ---------------------------------------------------------------- faults are retried to the end


@pytest.mark.parametrize("stream", [False, True])
def test_every_fault_is_retried_until_every_row_is_ok(
    keyed: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    keyed.configure(fault_rate=0.2, hang_s=1.0, seed=11)
    rows = prompts(80)
    run, outp = run_job(capsys, keyed, tmp_path, rows, "--concurrency", "8",
                        "--stream" if stream else "--no-stream")
    assert run.code == 0, run.err

    got = rows_by_id(outp)
    assert sorted(got) == [r["id"] for r in rows]  # none missing, none twice
    assert {r["status"] for r in got.values()} == {"ok"}
    assert {r["http_status"] for r in got.values()} == {200}
    retried = [r for r in got.values() if r["attempts"] > 1]
    assert retried, "faults at 20 % should have made some rows retry"

    stats = keyed.stats
    assert set(stats["by_fault"]) == set(SimConfig().faults)  # every kind was met and survived
    # every request the server saw was an attempt of some row, and nothing more
    assert stats["requests"] == sum(r["attempts"] for r in got.values())

    # one retry line per retry, naming the row, the attempt, the wait and the cause
    lines = RETRY_LINE.findall(run.err)
    assert len(lines) == stats["requests"] - len(rows)
    per_row: dict[str, list[int]] = {}
    for row_id, attempt, cause, wait in lines:
        per_row.setdefault(row_id, []).append(int(attempt))
        assert cause and float(wait) <= 0.05
    assert {rid: max(a) + 1 for rid, a in per_row.items()} == {r["id"]: r["attempts"] for r in retried}
    assert SECRET not in run.err and SECRET not in run.out


def test_a_row_that_runs_out_of_attempts_is_written_failed_with_its_last_error(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(fault_rate=1.0, faults=["503"])
    rows = prompts(4)
    run, outp = run_job(capsys, sim, tmp_path, rows, "--concurrency", "2", max_attempts=3)
    assert run.code == 1, run.err
    got = rows_by_id(outp)
    assert sorted(got) == [r["id"] for r in rows]
    for row in got.values():
        assert row["status"] == "failed"
        assert row["attempts"] == 3
        assert row["http_status"] == 503
        assert row["error_code"] == "service_unavailable"
        assert row["error"].endswith("simulated server error")
        assert row["text"] is None
    assert sim.stats["requests"] == 3 * len(rows)
    assert len(RETRY_LINE.findall(run.err)) == 2 * len(rows)
    assert "0 ok, 4 failed" in run.out


def test_a_400_fails_its_row_at_once_and_the_job_goes_on(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(context_tokens=60)
    rows = prompts(6)
    rows[2]["prompt"] = " ".join(["word"] * 100)  # past the context length
    run, outp = run_job(capsys, sim, tmp_path, rows)
    assert run.code == 1, run.err
    got = rows_by_id(outp)
    bad = got.pop(rows[2]["id"])
    assert bad["status"] == "failed"
    assert bad["http_status"] == 400
    assert bad["error_code"] == "context_length_exceeded"
    assert "maximum context length is 60 tokens" in bad["error"]
    assert bad["attempts"] == 1
    assert {r["status"] for r in got.values()} == {"ok"}
    assert sim.stats["requests"] == len(rows)  # not retried
    assert not RETRY_LINE.search(run.err)


# ---------------------------------------------------------------- fatal answers stop the job


@pytest.mark.parametrize(
    ("status", "cause"),
    [
        (401, "the API key was refused (401)"),
        (402, "payment required (402)"),
        (403, "access forbidden (403)"),
        (429, "the quota is spent (429, insufficient_quota)"),
    ],
)
def test_a_fatal_answer_stops_the_job_and_keeps_what_was_done(
    keyed: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, cause: str
) -> None:
    keyed.configure(fatal_status=status, fatal_after=5)
    rows = prompts(30)
    run, outp = run_job(capsys, keyed, tmp_path, rows, "--concurrency", "1")
    assert run.code == 3, run.err

    errors = [line for line in run.err.splitlines() if "promptmill:" in line and cause in line]
    assert len(errors) == 1, run.err
    assert "Traceback" not in run.err
    assert SECRET not in run.err and SECRET not in run.out
    # the five rows answered before it are in the output; nothing was retried
    got = rows_by_id(outp)
    assert sorted(got) == [r["id"] for r in rows[:5]]
    assert {r["status"] for r in got.values()} == {"ok"}
    assert keyed.stats["requests"] == 6
    summary = json.loads((outp.parent / "res.parquet.summary.json").read_text())
    assert summary["rows_ok"] == 5

    # fixed, the same command finishes the job without redoing those rows
    keyed.configure(fatal_status=None)
    keyed.reset_stats()
    rerun, _ = run_job(capsys, keyed, tmp_path, rows, "--concurrency", "4")
    assert rerun.code == 0, rerun.err
    assert sorted(rows_by_id(outp)) == [r["id"] for r in rows]
    assert keyed.stats["requests"] == 25


def test_a_wrong_key_stops_the_job_at_the_first_answer(
    keyed: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATOMA_API_KEY", "sk-not-the-right-one-42")
    run, _ = run_job(capsys, keyed, tmp_path, prompts(20), "--concurrency", "4")
    assert run.code == 3
    assert "the API key was refused (401)" in run.err and "invalid API key" in run.err
    assert "sk-not-the-right-one-42" not in run.err + run.out
    # a handful in flight at most, not twenty times five attempts
    assert keyed.stats["requests"] <= 4
    assert not RETRY_LINE.search(run.err)


# ---------------------------------------------------------------- the simulator hooks used above


def test_simulator_fatal_after_answers_normally_first(sim: SimServer) -> None:
    sim.configure(fatal_status=401, fatal_after=2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client() as client:
        statuses = [client.post(f"{sim.base_url}/chat/completions", json=body).status_code for _ in range(4)]
    assert statuses == [200, 200, 401, 401]
    with pytest.raises(ValueError, match="fatal_after"):
        sim.configure(fatal_after=-1)


def test_simulator_context_length_answers_400(sim: SimServer) -> None:
    sim.configure(context_tokens=10)
    with httpx.Client() as client:
        short = client.post(f"{sim.base_url}/completions",
                            json={"model": MODEL, "prompt": "a b c", "max_tokens": 7})
        long = client.post(f"{sim.base_url}/completions",
                           json={"model": MODEL, "prompt": "a b c", "max_tokens": 4, "n": 2})
    assert short.status_code == 200
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "context_length_exceeded"
