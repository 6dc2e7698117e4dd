"""Sweeps end to end on the simulator: every (id, variant, sample) once, with its own parameters."""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimConfig, SimServer
from batch.variants import sample_seed
from tests.helpers import run_cli, write_jsonl
from tests.sweep_output import ROWS, sweep_job
from tests.test_resume import kill_after, requests, run, write_job


def test_a_2x2x3_grid_gives_12_rows_per_id_each_sent_with_its_parameters(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_cli(capsys, "run", sweep_job(tmp_path, sim), "--no-progress")
    assert run.code == 0, run.err
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    per_id = collections.Counter(r["id"] for r in rows)
    assert per_id == {r["id"]: 12 for r in ROWS}
    assert all(r["status"] == "ok" for r in rows)
    keys = {(r["id"], r["variant"], r["sample"]) for r in rows}
    assert len(keys) == 60
    for r in rows:
        model = r["variant"].split(",")[0].removeprefix("model=")
        assert r["model"] == model
        assert f"temperature={r['params'].split('temperature')[1][2:5]}" in r["variant"]
        assert r["score_correct"] == (1.0 if r["text"] == f"The answer is {r['answer']}." else 0.0)
    seen = sim.stats["params_seen"]
    assert len(seen) == 60
    sent = collections.Counter((b["model"], b["temperature"], b["seed"]) for b in seen)
    expected = collections.Counter((m, t, sample_seed(r["id"], s)) for r in ROWS for m in ("sim-small", "sim-large")
                                   for t in (0.0, 0.7) for s in range(3))
    assert sent == expected


def test_adding_a_variant_sends_only_its_requests(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "run", sweep_job(tmp_path, sim), "--no-progress").code == 0
    before = len(sim.stats["params_seen"])
    job = sweep_job(tmp_path, sim, '[[sweep.variant]]\nname = "top"\nmodel = "sim-large"\ntop_p = 0.5\n')
    assert run_cli(capsys, "run", job, "--no-progress").code == 0
    new = sim.stats["params_seen"][before:]
    assert len(new) == 15 and all(b.get("top_p") == 0.5 for b in new)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 75 and len({(r["id"], r["variant"], r["sample"]) for r in rows}) == 75
    meta = pq.read_schema(tmp_path / "out.parquet").metadata[b"promptmill.job"]
    assert b'"baseline":"model=sim-small,temperature=0.0"' in meta and b'"name":"top"' in meta


# --- kill, lanes, fatal answers -------------------------------------------------------


def _two_target_job(tmp_path: Path, sim: SimServer, second: SimServer, n: int, second_variant: str) -> Path:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i:03d}", "prompt": f"What is {i} + 1?"} for i in range(n)])
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "{inp}"
[output]
path = "{tmp_path / 'out.parquet'}"
flush_rows = 5
[api]
base_url = "{sim.base_url}"
[request]
model = "sim-small"
max_tokens = 8
[retry]
max_attempts = 2
initial_wait_s = 0.01
[[sweep.variant]]
name = "first"
model = "sim-small"
[[sweep.variant]]
name = "second"
model = "sim-large"
base_url = "{second.base_url}"
{second_variant}
""")
    return job


def test_sigkill_mid_sweep_then_rerun_has_every_id_variant_sample_once(sim: SimServer, tmp_path: Path) -> None:
    n, concurrency, flush_rows = 150, 16, 20
    sim.configure(latency_ms=20)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i:03d}", "prompt": f"Say {i}"} for i in range(n)])
    outp = tmp_path / "out.parquet"
    job = write_job(tmp_path / "job.toml", sim, inp, outp, concurrency=concurrency, flush_rows=flush_rows)
    with job.open("a") as f:
        f.write('[sweep]\nsamples = 2\n[sweep.grid]\ntemperature = [0.0, 0.7]\n')
    kills = kill_after(job, sim, (60, 250))
    code, out, err = run(job)
    assert code == 0, err
    assert "already done (skipped)" in out
    rows = pq.read_table(outp, columns=["id", "variant", "sample", "status"]).to_pylist()
    keys = [(r["id"], r["variant"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == n * 4
    assert set(keys) == {(f"r{i:03d}", f"temperature={t}", s) for i in range(n) for t in ("0.0", "0.7")
                         for s in (0, 1)}
    assert {r["status"] for r in rows} == {"ok"}
    # a kill loses at most the requests in flight and the rows not yet flushed
    assert requests(sim) <= n * 4 + kills * (concurrency + flush_rows)


def test_a_rate_limited_second_target_does_not_hold_back_the_first(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    n = 12
    # the second server allows 10 requests a second; its variant asks for 5 a second
    with SimServer(SimConfig(rpm=10, window_s=1.0)) as second:
        job = _two_target_job(tmp_path, sim, second, n, "rpm = 300\nconcurrency = 2")
        run = run_cli(capsys, "run", job, "--no-progress")
        assert run.code == 0, run.err
        assert second.stats["rate_limited"] == 0 and second.stats["requests"] == n
    assert sim.stats["rate_limited"] == 0 and sim.stats["requests"] == n
    rows = pq.read_table(tmp_path / "out.parquet", columns=["variant", "status", "finished_at"]).to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    done = {v: sorted(r["finished_at"] for r in rows if r["variant"] == v) for v in ("first", "second")}
    # the unlimited lane was done while the paced one had not yet sent half its requests
    assert done["first"][-1] < done["second"][n // 2]


def test_a_fatal_answer_stops_only_its_targets_variants(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    n = 20
    monkeypatch.setenv("SECOND_KEY", "not-the-key")
    with SimServer(SimConfig(api_key="the-right-key")) as second:
        job = _two_target_job(tmp_path, sim, second, n, 'api_key_env = "SECOND_KEY"')
        run = run_cli(capsys, "run", job, "--no-progress")
        assert second.stats["by_status"].get("401", 0) >= 1
    assert run.code == 3, run.err
    host = second.base_url.split("//")[1].split("/")[0]
    line = next(x for x in run.err.splitlines() if "target" in x and "second" in x)
    assert host.split(":")[0] in line and "not-the-key" not in run.err + run.out
    rows = pq.read_table(tmp_path / "out.parquet", columns=["id", "variant", "status"]).to_pylist()
    first = [r for r in rows if r["variant"] == "first"]
    assert len(first) == n and {r["status"] for r in first} == {"ok"}
    assert all(r["status"] != "ok" for r in rows if r["variant"] == "second")
