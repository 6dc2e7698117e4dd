"""Safe to kill, safe to rerun: the CLI as a separate process, killed and signalled mid-job.

Every run here is ``python -m batch run`` in a subprocess against the simulator
on loopback; the simulator's request counter is what a run was charged for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from batch.errors import JobFileError, OutputBusy
from batch.simulator import SimConfig, SimServer
from batch.spec_load import load_job
from tests.helpers import prompts, run_cli, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
MODEL = "simulator-small"


def write_job(path: Path, sim: SimServer, inp: Path, outp: Path, *, name: str = "resume",
              model: str = MODEL, concurrency: int = 32, flush_rows: int = 50, flush_s: float = 0.5,
              max_attempts: int = 5) -> Path:
    path.write_text(f"""\
[job]
name = "{name}"

[input]
path = "{inp}"

[output]
path = "{outp}"
flush_rows = {flush_rows}
flush_s = {flush_s}

[api]
base_url = "{sim.base_url}"

[request]
model = "{model}"
max_tokens = 32

[limits]
concurrency = {concurrency}

[retry]
max_attempts = {max_attempts}
initial_wait_s = 0.01
""")
    return path


def start(job: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(job), "--no-progress", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(job: Path, *args: str) -> tuple[int, str, str]:
    return finish(start(job, *args))


def wait_for(what: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before the moment to interrupt it:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("timed out waiting for the moment to interrupt the run")
        time.sleep(0.01)


def kill_after(job: Path, sim: SimServer, mores: tuple[int | None, ...],
               started: Callable[[], bool] = lambda: True) -> int:
    """Start the job and SIGKILL it once the simulator has seen ``more`` further requests (None: once
    ``started()``), for each of ``mores``; the number of kills."""
    for more in mores:
        proc = start(job)
        if more is None:
            wait_for(started, proc)
        else:
            target = requests(sim) + more
            wait_for(lambda t=target: requests(sim) >= t, proc)  # type: ignore[misc]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    return len(mores)


def parts(outp: Path) -> list[Path]:
    return sorted(outp.with_name(outp.name + ".parts").glob("run-*.arrow"))


def requests(sim: SimServer) -> int:
    count: int = sim.stats["requests"]
    return count


def output_rows(outp: Path) -> list[dict[str, Any]]:
    return pq.read_table(outp, columns=["id", "status", "model"]).to_pylist()


def test_flush_settings_come_from_the_job_file(tmp_path: Path) -> None:
    base = '[input]\npath = "in.jsonl"\n[api]\nbase_url = "simulator"\n[request]\nmodel = "m"\n[output]\npath = "o.parquet"\n'
    job = tmp_path / "job.toml"
    job.write_text(base)
    assert (load_job(job).flush_rows(), load_job(job).output.flush_s) == (500, 2.0)
    # by default a part holds at least as many rows as there are requests in flight
    assert load_job(job, {"limits.concurrency": 2000}).flush_rows() == 2000
    job.write_text(base + "flush_rows = 20\nflush_s = 0.25\n")
    assert (load_job(job).flush_rows(), load_job(job).output.flush_s) == (20, 0.25)
    assert load_job(job, {"limits.concurrency": 2000}).flush_rows() == 20
    job.write_text(base + "flush_rows = 0\n")
    with pytest.raises(JobFileError, match=r"output\.flush_rows"):
        load_job(job)


def test_sigkill_at_several_points_then_rerun_finishes_every_row_once(sim: SimServer, tmp_path: Path) -> None:
    n, concurrency, flush_rows = 2000, 32, 50
    sim.configure(latency_ms=20)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    outp = tmp_path / "out" / "res.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, concurrency=concurrency, flush_rows=flush_rows)

    # at start-up (before a request), then after 100, 300 and 500 more requests
    kills = kill_after(job, sim, (None, 100, 300, 500), lambda: outp.with_name("res.parquet.parts").joinpath("lock").exists())

    code, out, err = run(job)
    assert code == 0, err
    assert "already done (skipped)" in out
    rows = output_rows(outp)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {p["id"] for p in prompts(n)}
    assert {r["status"] for r in rows} == {"ok"}
    assert not outp.with_name("res.parquet.parts").exists()
    # a kill loses at most the requests in flight and the rows not yet flushed
    assert requests(sim) <= n + kills * (concurrency + flush_rows)


def test_sigterm_keeps_flushed_rows_prints_the_summary_and_the_rerun_sends_only_the_rest(
    sim: SimServer, tmp_path: Path
) -> None:
    n = 300
    sim.configure(latency_ms=20)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    outp = tmp_path / "res.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, flush_rows=20)

    proc = start(job)
    wait_for(lambda: len(parts(outp)) >= 2, proc)
    flushed = {i for p in parts(outp) for i in feather.read_table(p, columns=["id"])["id"].to_pylist()}
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143, err
    assert "stopped early: SIGTERM received" in out
    assert "SIGTERM: finishing the requests in flight" in err
    rows = output_rows(outp)
    kept = {r["id"] for r in rows}
    assert flushed <= kept
    assert {r["status"] for r in rows} == {"ok"}
    # the requests in flight were let finish and kept: nothing was paid for and dropped
    assert len(kept) == len(rows) == requests(sim) < n
    assert f"{len(kept)} ok" in out

    code, out, err = run(job)
    assert code == 0, err
    assert f"{len(kept)} already done (skipped)" in out
    assert requests(sim) == n
    ids = [r["id"] for r in output_rows(outp)]
    assert len(ids) == len(set(ids)) == n


def test_sigint_waits_for_requests_in_flight_and_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    # its own simulator: the requests left hanging must not reach other tests' counters
    with SimServer(SimConfig(latency_ms=20)) as sim:
        inp = write_jsonl(tmp_path / "in.jsonl", prompts(400))
        outp = tmp_path / "res.parquet"
        job = write_job(tmp_path / "job.toml", sim, inp, outp, concurrency=8, flush_rows=20)
        proc = start(job)
        wait_for(lambda: len(parts(outp)) >= 1, proc)
        sim.configure(latency_ms=20_000)  # from now on every request hangs
        time.sleep(0.3)
        flushed = {i for p in parts(outp) for i in feather.read_table(p, columns=["id"])["id"].to_pylist()}
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the requests in flight, within the grace period
        proc.send_signal(signal.SIGINT)
        code, out, err = finish(proc, timeout=10)
        assert code == 130, err
        assert "second signal: stopping now" in err
        assert "stopped early: SIGINT received" in out
        kept = {r["id"] for r in output_rows(outp)}
        assert flushed <= kept

        # one signal, and requests that outlast the grace period: it stops when the period ends
        before = requests(sim)
        proc = start(job, "--grace-period", "0.5")
        wait_for(lambda: requests(sim) > before, proc)
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc, timeout=10)
        assert code == 143, err
        assert {r["id"] for r in output_rows(outp)} == kept


def test_changing_the_model_redoes_every_row_and_changing_nothing_redoes_none(
    sim: SimServer, tmp_path: Path
) -> None:
    n = 120
    sim.configure(latency_ms=20)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    outp = tmp_path / "res.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, concurrency=8, flush_rows=10)

    proc = start(job)  # a partial run
    wait_for(lambda: len(parts(outp)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    before = requests(sim)

    write_job(job, sim, inp, outp, concurrency=8, flush_rows=10, model="simulator-large")
    code, out, err = run(job)
    assert code == 0, err
    assert requests(sim) - before == n  # nothing skipped: every request changed
    rows = output_rows(outp)
    assert len(rows) == n and {r["model"] for r in rows} == {"simulator-large"}

    code, out, err = run(job)
    assert code == 0, err
    assert requests(sim) - before == n  # nothing changed, nothing sent
    assert f"{n} already done (skipped)" in out

    code, out, err = run(job, "--max-tokens", "16")
    assert code == 0, err
    assert requests(sim) - before == 2 * n
    assert len(output_rows(outp)) == n


def test_failed_rows_are_retried_by_default_kept_with_no_retry_failed_and_fresh_starts_over(
    sim: SimServer, tmp_path: Path
) -> None:
    n = 60
    sim.configure(fault_rate=0.3, faults=("500",), seed=4)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    outp = tmp_path / "res.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, max_attempts=1)

    code, out, err = run(job)
    assert code == 1, err
    failed = {r["id"] for r in output_rows(outp) if r["status"] == "failed"}
    assert 0 < len(failed) < n

    sim.configure(fault_rate=0.0)
    code, out, err = run(job, "--no-retry-failed")
    assert code == 1, err  # the output still holds failed rows
    assert f"{n} already done (skipped), of which {len(failed)} failed earlier and were kept" in out, err
    assert json.loads(outp.with_name(outp.name + ".summary.json").read_text())["rows_failed_kept"] == len(failed)
    assert requests(sim) == n  # nothing sent
    assert {r["id"] for r in output_rows(outp) if r["status"] == "failed"} == failed

    code, out, err = run(job)
    assert code == 0, err
    assert requests(sim) == n + len(failed)  # only the failed rows again
    rows = output_rows(outp)
    assert len(rows) == n and {r["status"] for r in rows} == {"ok"}

    code, _, err = run(job, "--fresh")
    assert code == 0, err
    assert requests(sim) == 2 * n + len(failed)
    assert len(output_rows(outp)) == n


def test_a_second_run_on_the_same_output_stops_at_start(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(latency_ms=50)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    outp = tmp_path / "res.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, concurrency=4)
    first = start(job)
    wait_for(lambda: requests(sim) > 0, first)

    second = run_cli(capsys, "run", job, "--no-progress")
    assert second.code == 75  # EX_TEMPFAIL: a retry once the first run is done succeeds
    assert f"another promptmill run is writing this output (process {first.pid})" in second.err
    assert "Traceback" not in second.err

    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 143
    # the lock went with the first run
    again = run_cli(capsys, "run", job, "--no-progress")
    assert again.code == 0, again.err
    assert len(output_rows(outp)) == 40


def test_an_output_of_another_job_is_refused_unless_fresh(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    other_input = write_jsonl(tmp_path / "other.jsonl", prompts(5))
    outp = tmp_path / "res.parquet"
    job_a = write_job(tmp_path / "a.toml", sim, inp, outp, name="a")
    assert run_cli(capsys, "run", job_a, "--no-progress").code == 0
    written = outp.read_bytes()

    for job in (write_job(tmp_path / "b.toml", sim, inp, outp, name="b"),
                write_job(tmp_path / "c.toml", sim, other_input, outp, name="a")):
        refused = run_cli(capsys, "run", job, "--no-progress")
        assert refused.code == 2
        assert "this output was written by another job ('a' reading" in refused.err
        assert "--fresh" in refused.err
        assert outp.read_bytes() == written
    assert requests(sim) == 5

    fresh = run_cli(capsys, "run", tmp_path / "b.toml", "--no-progress", "--fresh")
    assert fresh.code == 0, fresh.err
    assert requests(sim) == 10


def test_a_parquet_file_without_our_columns_at_the_output_path_is_one_clear_line(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    outp = tmp_path / "res.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), outp)  # someone else's file
    refused = run_cli(capsys, "run", write_job(tmp_path / "a.toml", sim, inp, outp), "--no-progress")
    assert refused.code == 2
    assert refused.err.strip().splitlines() == [
        f"promptmill: {outp}: a file that promptmill did not write is in the way (no promptmill metadata); "
        "it is never replaced, not even with --fresh: move it away or choose another output"
    ]
    assert pq.read_table(outp).column_names == ["a"] and requests(sim) == 0
    # --fresh does not replace it either
    refused = run_cli(capsys, "run", tmp_path / "a.toml", "--no-progress", "--fresh")
    assert refused.code == 2 and "not even with --fresh" in refused.err
    assert pq.read_table(outp).column_names == ["a"] and requests(sim) == 0


def test_the_job_identity_of_a_default_id_column_is_what_earlier_versions_wrote(tmp_path: Path) -> None:
    # an output an earlier version wrote names "id" as its id column: it must still be resumed
    from batch.outputs import job_identity

    job = tmp_path / "job.toml"
    job.write_text('[input]\npath = "in.jsonl"\n[output]\npath = "o.parquet"\n[api]\nbase_url = "simulator"\n'
                   '[request]\nmodel = "m"\n')
    assert job_identity(load_job(job)) == {"job": "job", "input": str(Path("in.jsonl").resolve()), "id_column": "id"}
    assert job_identity(load_job(job, {"input.id_column": "uid"}))["id_column"] == "uid"


def test_a_lock_on_a_lock_file_removed_meanwhile_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch import store as out
    from batch.store import lock as lock_module

    output = tmp_path / "res.parquet"
    real_flock = lock_module.fcntl.flock
    removed = []

    def flock_after_the_finishing_run_removed_the_folder(fd: int, op: int) -> None:
        if not removed:  # the run that held the lock finishes and removes its parts folder
            out.remove_parts_dir(output)
            removed.append(True)
        real_flock(fd, op)

    monkeypatch.setattr(lock_module.fcntl, "flock", flock_after_the_finishing_run_removed_the_folder)
    lock = out.OutputLock(output)
    lock.acquire()
    monkeypatch.setattr(lock_module.fcntl, "flock", real_flock)
    assert lock.path.exists()  # it holds the lock file that is there now, not the removed one
    with pytest.raises(OutputBusy, match="another promptmill run is writing this output"):
        out.OutputLock(output).acquire()
    lock.release()


def test_the_builder_skips_only_rows_done_with_the_same_request(tmp_path: Path) -> None:
    from batch.prompts import RequestBuilder
    from batch.sources import open_source

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    spec = load_job(None, {"input.path": str(inp), "output.path": str(tmp_path / "o.parquet"),
                           "api.base_url": "simulator", "request.model": MODEL})
    builder = RequestBuilder(spec)
    rows = [row for batch in open_source(spec.input).batches() for row in batch]
    built = [builder.build(row) for row in rows]
    done = {(built[0].id, built[0].fingerprint), (built[1].id, "another request")}
    assert builder.build_unless_done(rows[0], done) is None
    again = builder.build_unless_done(rows[1], done)
    assert again == built[1]
