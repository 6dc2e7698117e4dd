"""The API key never leaves the environment: not in a log line, an error, an output or its metadata.

Jobs run with a known random key against the simulator (which checks it),
with faults, a refused key (401), and ``--debug`` with httpx's own debug
logging. Then every file written and every line printed is searched for the key.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from batch.runner import RunOptions, run_job
from batch.simulator import SimServer
from batch.spec_load import load_job
from batch.store import METADATA_KEY
from tests.helpers import CliRun, prompts, run_cli, write_jsonl

MODEL = "simulator-small"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"sk-test-{secrets.token_hex(16)}"
    monkeypatch.setenv("ATOMA_API_KEY", value)
    return value


@pytest.fixture(autouse=True)
def restore_log_levels() -> Iterator[None]:
    names = ("httpx", "httpcore", "batch")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def job_toml(tmp_path: Path, inp: Path, outp: Path, base_url: str, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'[input]\npath = "{inp}"\n[output]\npath = "{outp}"\n'
        f'[api]\nbase_url = "{base_url}"\n[request]\nmodel = "{MODEL}"\n'
        "[retry]\nmax_attempts = 2\ninitial_wait_s = 0\nmax_wait_s = 0\n" + extra
    )
    return path


def all_text_of(folder: Path, skip: set[Path]) -> Iterator[tuple[Path, str]]:
    """Every file under ``folder`` as text: raw bytes, and for Parquet its decoded rows and metadata."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path in skip:
            continue
        yield path, path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            yield path, json.dumps(table.to_pylist(), default=str)
            yield path, repr(table.schema.metadata)


def assert_nowhere(key: str, folder: Path, runs: list[CliRun], skip: set[Path] = frozenset()) -> int:  # type: ignore[assignment]
    checked = 0
    for path, text in all_text_of(folder, set(skip)):
        assert key not in text, f"the key is in {path}"
        # no recognisable piece of it either (an error message cut in the middle of it)
        assert key[8:24] not in text, f"part of the key is in {path}"
        checked += 1
    for run in runs:
        assert key not in run.out and key not in run.err
        assert key[8:24] not in run.out + run.err
    return checked


def test_key_never_written_or_printed(
    tmp_path: Path, sim: SimServer, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    outp = tmp_path / "out" / "res.parquet"
    job = job_toml(tmp_path, inp, outp, sim.base_url)
    runs = []

    # 1. faults of every kind, streamed, with --debug (httpx and httpcore log at debug level)
    sim.configure(api_key=key, fault_rate=0.4, faults=("500", "502", "503", "reset", "malformed", "cut"), seed=7)
    run = run_cli(capsys, "run", job, "--stream", "--concurrency", "4", "--no-progress", "--debug")
    runs.append(run)
    assert run.code in (0, 1), run.err
    assert "POST http://127.0.0.1" in run.err  # the client's per-request debug lines were on
    assert sum(sim.stats["by_fault"].values()) > 0
    assert sim.stats["by_status"].get("200", sim.stats["by_status"].get(200, 0)) > 0
    table = pq.read_table(outp)
    assert table.num_rows == 40

    # 2. the same job, non-streamed, into another output
    sim.configure(stream_done=False, seed=11)
    run = run_cli(capsys, "run", job, "--no-stream", "--output", tmp_path / "out" / "res2.parquet",
                  "--no-progress", "--debug")
    runs.append(run)
    assert run.code in (0, 1), run.err

    # 3. the key refused (401): the job stops, with --debug
    sim.configure(api_key="sk-some-other-key-entirely", fault_rate=0.0)
    run = run_cli(capsys, "run", job, "--output", tmp_path / "out" / "res3.parquet", "--no-progress", "--debug")
    runs.append(run)
    assert run.code == 3, run.err
    assert "401" in run.err

    checked = assert_nowhere(key, tmp_path, runs, skip={job, inp})
    assert checked >= 6  # outputs, summaries, parts

    for name in ("res.parquet", "res2.parquet"):
        meta = pq.read_schema(tmp_path / "out" / name).metadata
        doc = json.loads(meta[METADATA_KEY])
        assert doc["settings"]["api"]["api_key_env"] == "ATOMA_API_KEY"
        assert doc["settings"]["api"]["base_url"] == sim.base_url
        assert doc["settings"]["request"]["model"] == MODEL
        assert doc["identity"]["job"] == "job"


def test_key_in_a_custom_variable_is_kept_out_of_debug_logs(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    value = f"vllm-{secrets.token_hex(16)}"
    monkeypatch.setenv("MY_VLLM_KEY", value)
    sim.configure(api_key=value, fault_rate=0.3, faults=("500", "malformed"), seed=2)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    outp = tmp_path / "res.parquet"
    job = job_toml(tmp_path, inp, outp, sim.base_url, '[job]\nname = "custom"\n')
    job.write_text(job.read_text().replace("[request]", 'api_key_env = "MY_VLLM_KEY"\n[request]'))
    # were a future change to log the key, the CLI's log formatter would still hide it
    import batch.runner

    check_api = batch.runner.check_api

    def check_and_log(spec: Any) -> str | None:
        found = check_api(spec)
        logging.getLogger("batch.runner").warning("careless log line: key=%s", found)
        return found

    monkeypatch.setattr(batch.runner, "check_api", check_and_log)
    run = run_cli(capsys, "run", job, "--no-progress", "--debug")
    assert "careless log line: key=[redacted]" in run.err
    assert run.code in (0, 1), run.err
    assert pq.read_table(outp).num_rows == 10
    assert_nowhere(value, tmp_path, [run], skip={job, inp})
    doc = json.loads(pq.read_schema(outp).metadata[METADATA_KEY])
    assert doc["settings"]["api"]["api_key_env"] == "MY_VLLM_KEY"


def test_key_of_the_built_in_simulator_is_not_in_the_metadata(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # a job on the built-in simulator may set the key that fake server expects; it is not recorded
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    outp = tmp_path / "res.parquet"
    job = job_toml(tmp_path, inp, outp, "simulator", f'[simulator]\napi_key = "{key}"\n')
    run = run_cli(capsys, "run", job, "--no-progress", "--debug")
    assert run.code == 0, run.err
    assert_nowhere(key, tmp_path, [run], skip={job, inp})


async def test_key_echoed_by_the_server_is_redacted(tmp_path: Path, key: str) -> None:
    """A server (or proxy) that quotes the Authorization header back in its errors."""

    def echo(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        n = int(request.content.decode().split("fact number ")[1].split()[0])
        if n % 3 == 0:
            return httpx.Response(400, json={"error": {"code": auth, "message": f"bad header {auth}"}})
        if n % 3 == 1:
            return httpx.Response(200, json={"error": {"code": "E", "message": f"refused {auth}"}})
        return httpx.Response(500, text=f"<html><title>proxy saw {auth}</title></html>")

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(9))
    spec = load_job(None, {
        "input.path": str(inp), "output.path": str(tmp_path / "out.parquet"),
        "api.base_url": "https://api.example.invalid/v1", "request.model": "m",
        "retry.max_attempts": 2, "retry.initial_wait_s": 0.0, "retry.max_wait_s": 0.0,
    })

    async def no_sleep(_: float) -> None:
        return None

    opts = RunOptions(transport=httpx.MockTransport(echo), sleep=no_sleep, handle_signals=False, progress=False)
    summary = await run_job(spec, opts)
    assert summary.rows_failed == 9
    rows: list[dict[str, Any]] = pq.read_table(spec.output_path()).to_pylist()
    assert all("[redacted]" in r["error"] for r in rows)
    assert_nowhere(key, tmp_path, [], skip={inp})
