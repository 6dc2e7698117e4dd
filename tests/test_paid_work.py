"""Nothing a server, a disk or a signal does loses paid work (issue 11).

End to end through the CLI, against a small hostile loopback server
(``tests/hostile.py``): numbers no column can hold, long waits, bad bytes, a
server echoing the key, full disks, an input changing under the job, links,
and signals during the final assembly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.helpers import prompts, run_cli, write_jsonl, write_parquet
from tests.hostile import Answer, HostileServer, ok


def job_toml(tmp_path: Path, inp: Path, outp: Path, base_url: str, extra: str = "", inputs: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'[input]\npath = "{inp}"\n{inputs}[output]\npath = "{outp}"\n'
        f'[api]\nbase_url = "{base_url}"\n[request]\nmodel = "m"\n'
        "[limits]\nconcurrency = 4\n"
        "[retry]\nmax_attempts = 2\ninitial_wait_s = 0\nmax_wait_s = 0\n" + extra
    )
    return path


def rows_of(path: Path) -> list[dict[str, Any]]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: str(r["id"]))


# -- ids ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [(True, "bool true"), ([1, 2], "list [1,2]"), ({"a": 1}, 'dict {"a":1}')])
def test_an_id_that_is_a_boolean_list_or_object_is_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any, shown: str
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": value, "prompt": "y"}])
    with HostileServer(lambda n, body: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, tmp_path / "out.parquet", server.base_url), "--no-progress")
        assert server.requests == 0
    assert run.code == 2
    assert f"{inp}, line 2, column 'id': an id must be a string or a number, not {shown}" in run.err
    assert "Traceback" not in run.err


def test_a_boolean_id_column_in_parquet_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_parquet(tmp_path / "in.parquet", [{"id": True, "prompt": "x"}, {"id": False, "prompt": "y"}])
    run = run_cli(capsys, "run", job_toml(tmp_path, inp, tmp_path / "out.parquet", "http://127.0.0.1:9/v1"),
                  "--no-progress")
    assert run.code == 2
    assert f"{inp}, line 1, column 'id': an id must be a string or a number, not bool" in run.err


def test_a_boolean_id_with_fail_row_is_a_failed_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": True, "prompt": "y"}])
    outp = tmp_path / "out.parquet"
    with HostileServer(lambda n, body: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url, inputs='on_bad_line = "fail_row"\n'),
                      "--no-progress")
    assert run.code == 1
    rows = rows_of(outp)
    assert [(r["id"], r["status"], r["error_code"]) for r in rows] == [("<line 2>", "failed", "bad_input"), ("a", "ok", None)]
    assert "not bool true" in rows[0]["error"]


# -- values checked where they enter -------------------------------------------


def test_usage_numbers_no_column_can_hold_fail_their_rows_and_every_other_row_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {7: {"prompt_tokens": 2**64 - 1, "completion_tokens": 2, "total_tokens": 3},
           50: {"prompt_tokens": 5, "completion_tokens": 1e30, "total_tokens": 3},
           120: {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2**63}}}
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(200))
    outp = tmp_path / "out.parquet"

    def answer(n: int, body: dict[str, Any]) -> Answer:
        i = int(body["messages"][-1]["content"].split("number ")[1].split()[0])
        return ok(usage=bad[i]) if i in bad else ok()

    with HostileServer(answer) as server:
        job = job_toml(tmp_path, inp, outp, server.base_url)
        run = run_cli(capsys, "run", job, "--no-progress")
        assert server.requests == 200  # a bad value is not retried: the same answer would be paid again
        assert run.code == 1
        rows = rows_of(outp)
        assert len(rows) == 200
        failed = {r["id"]: r for r in rows if r["status"] == "failed"}
        assert set(failed) == {"p0007", "p0050", "p0120"}
        assert {r["error_code"] for r in failed.values()} == {"bad_response"}
        assert "usage.prompt_tokens is not a token count: 18446744073709551615" in failed["p0007"]["error"]
        assert "usage.completion_tokens is not a token count: 1e+30" in failed["p0050"]["error"]
        assert "usage.cached_tokens is not a token count: 9223372036854775808" in failed["p0120"]["error"]
        summary = json.loads((tmp_path / "out.parquet.summary.json").read_text())
        assert summary["rows_ok"] == 197 and summary["rows_failed"] == 3

        # the rerun sends only the three failed rows again, and finishes
        run = run_cli(capsys, "run", job, "--no-progress")
        assert server.requests == 203
        assert run.code == 1 and len(rows_of(outp)) == 200


@pytest.mark.parametrize("body", [
    b'{"choices": [{"message": {"content": "caf\xe9 \xff ok"}, "finish_reason": "stop"}],'
    b' "usage": {"prompt_tokens": 5, "completion_tokens": 2}}',
    b'{"choices": [{"message": {"content": "half \\ud83d of a pair"}, "finish_reason": "stop"}],'
    b' "usage": {"prompt_tokens": 5, "completion_tokens": 2}}',
], ids=["invalid-utf8", "lone-surrogate"])
def test_a_json_answer_with_bad_bytes_is_kept_with_the_replacement_character_and_not_paid_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    outp = tmp_path / "out.parquet"
    with HostileServer(lambda n, b: (200, {"content-type": "application/json"}, body)) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress")
        assert server.requests == 3
    assert run.code == 0, run.err
    texts = {r["text"] for r in rows_of(outp)}
    assert len(texts) == 1
    text = texts.pop()
    assert "\ufffd" in text and text.startswith(("caf", "half ")) and text.endswith(("ok", "of a pair"))


# -- the key ---------------------------------------------------------------------


def test_a_key_the_server_echoes_is_redacted_in_the_output_summary_and_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-" + "7f3a9c" * 5
    monkeypatch.setenv("ATOMA_API_KEY", key)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    outp = tmp_path / "out" / "out.parquet"

    def answer(n: int, body: dict[str, Any]) -> Answer:
        i = int(body["messages"][-1]["content"].split("number ")[1].split()[0])
        if i == 1:  # a 200 whose error code and message carry it: retried, then failed
            return 200, {"content-type": "application/json"}, json.dumps(
                {"error": {"code": f"bad-{key}", "message": f"your key {key} is odd"}}).encode()
        if i == 2:
            return 400, {"content-type": "application/json"}, json.dumps(
                {"error": {"code": "BAD", "message": f"key {key} refused"}}).encode()
        return ok(f"I was sent the key {key}, here it is: {key}.")

    with HostileServer(answer) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress")
    assert run.code == 1
    rows = rows_of(outp)
    assert rows[0]["text"] == "I was sent the key [redacted], here it is: [redacted]."
    assert "[redacted]" in rows[1]["error"] and "[redacted]" in rows[2]["error"]
    seen = run.out + run.err
    for path in (outp.parent).rglob("*"):
        if path.is_file():
            seen += path.read_bytes().decode("latin-1")
            if path.suffix == ".parquet":
                seen += json.dumps(pq.read_table(path).to_pylist(), default=str)
    assert key not in seen and key[8:20] not in seen
    assert "[redacted]" in (outp.parent / "out.parquet.summary.json").read_text() or "[redacted]" in run.out


# -- the input is never written; links ----------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
@pytest.mark.parametrize("fresh", [False, True])
def test_an_output_that_is_the_input_is_refused_whatever_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str, fresh: bool
) -> None:
    (tmp_path / "sub").mkdir()
    inp = write_parquet(tmp_path / "in.parquet", prompts(3))
    before = inp.read_bytes()
    outp = {"same": inp, "dotted": tmp_path / "sub" / ".." / "in.parquet", "link": tmp_path / "link.parquet"}[spelling]
    if spelling == "link":
        outp.symlink_to(inp)
    with HostileServer(lambda n, b: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress",
                      *(["--fresh"] if fresh else []))
        assert server.requests == 0
    assert run.code == 2
    assert run.err.strip().splitlines() == [
        f"promptmill: {outp}: the output is the input file {inp}: promptmill never writes its input; "
        "choose another output"
    ]
    assert inp.read_bytes() == before


def test_an_output_that_is_a_link_is_written_through_to_its_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "results.parquet"
    link = tmp_path / "latest.parquet"
    link.symlink_to(target)  # dangling until the first run writes the target
    with HostileServer(lambda n, b: ok()) as server:
        job = job_toml(tmp_path, inp, link, server.base_url)
        assert run_cli(capsys, "run", job, "--no-progress").code == 0
        assert link.is_symlink() and len(rows_of(target)) == 4
        # a rerun resumes through the link; --fresh replaces the target, not the link
        assert run_cli(capsys, "run", job, "--no-progress").code == 0
        assert server.requests == 4
        assert run_cli(capsys, "run", job, "--no-progress", "--fresh").code == 0
        assert server.requests == 8
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(rows_of(target)) == 4 and len(rows_of(link)) == 4


# -- full disks --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_disk_that_fills_up_stops_with_one_line_keeps_its_parts_and_the_rerun_finishes(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 400
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    outp = small_disk / "out.parquet"
    filler = small_disk / "filler"
    filler.write_bytes(os.urandom(2 * 2**20 - 400 * 2**10))  # 400 KB left
    sent: list[str] = []

    def answer(n: int, body: dict[str, Any]) -> Answer:
        sent.append(body["messages"][-1]["content"])
        return ok(os.urandom(1500).hex())  # 3 KB a row that compresses to about half: 400 rows need 1.2 MB

    with HostileServer(answer) as server:
        job = job_toml(tmp_path, inp, outp, server.base_url)
        job.write_text(job.read_text().replace(f'path = "{outp}"\n', f'path = "{outp}"\nflush_rows = 20\n'))
        run = run_cli(capsys, "run", job, "--no-progress")
        assert run.code == 74, run.err
        errors = [line for line in run.err.splitlines() if "cannot write" in line]
        assert len(errors) == 1, run.err
        assert "No space left on device (ENOSPC)" in errors[0] and str(small_disk) in errors[0]
        assert "every part already on disk is kept" in errors[0]
        assert "Traceback" not in run.err
        assert "stopped early" in run.out  # the summary is printed
        parts = sorted((small_disk / "out.parquet.parts").glob("*.arrow"))
        assert parts and not list((small_disk / "out.parquet.parts").glob(".*.tmp"))
        kept = sum(pq.read_metadata(p).num_rows if p.suffix == ".parquet" else _ipc_rows(p) for p in parts)
        assert 0 < kept < n

        filler.unlink()  # space again: the rerun sends only what is not on disk, and finishes
        run = run_cli(capsys, "run", job, "--no-progress")
        assert run.code == 0, run.err
    rows = pq.read_table(outp).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"p{i:04d}" for i in range(n)]  # none lost, none twice
    assert len(sent) - n <= n - kept  # nothing on disk was sent again


def _ipc_rows(path: Path) -> int:
    import pyarrow.ipc as ipc

    with open(path, "rb") as f:
        return int(ipc.open_file(f).read_all().num_rows)


@pytest.mark.parametrize("code", ["EDQUOT", "EIO", "EROFS"])
def test_every_disk_error_is_one_line_with_the_path_and_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    import errno

    from batch.store import parts

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    outp = tmp_path / "out.parquet"

    def failing(table: Any, path: Path) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(parts, "_write_part", failing)  # a disk failing in this one way
    with HostileServer(lambda n, b: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress")
    assert run.code == 74
    lines = [line for line in run.err.splitlines() if "cannot write" in line]
    assert len(lines) == 1 and f"({code})" in lines[0] and str(outp) + ".parts" in lines[0]
    assert "Traceback" not in run.err


# -- signals during the assembly ------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_assembly_lets_it_finish_then_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    signum: signal.Signals, code: int,
) -> None:
    from batch.store import assembly

    assemble = assembly.assemble

    def signalled_assemble(output: Path, schema: Any) -> int:
        os.kill(os.getpid(), signum)  # the signal arrives while the output is being assembled
        return assemble(output, schema)

    monkeypatch.setattr(assembly, "assemble", signalled_assemble)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    outp = tmp_path / "out.parquet"
    with HostileServer(lambda n, b: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress")
    assert run.code == code
    assert f"stopped early: {signum.name} received" in run.out
    assert "20 ok" in run.out
    assert len(rows_of(outp)) == 20 and not (tmp_path / "out.parquet.parts").exists()
    assert json.loads((tmp_path / "out.parquet.summary.json").read_text())["rows_ok"] == 20


# -- an input that changes under the job ---------------------------------------------


@pytest.mark.parametrize("change", ["rewritten", "truncated"])
def test_an_input_that_changes_under_the_job_stops_it_keeping_every_finished_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    n = 1100  # more than one batch of the reader (1,024 rows): the second is read after the change
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    original = inp.read_bytes()
    outp = tmp_path / "out.parquet"

    def answer(k: int, body: dict[str, Any]) -> Answer:
        if k == 5:
            if change == "truncated":
                with open(inp, "r+b") as f:
                    f.truncate(len(original) // 2)
            else:
                write_jsonl(inp, prompts(n + 10))
        return ok()

    with HostileServer(answer) as server:
        job = job_toml(tmp_path, inp, outp, server.base_url)
        job.write_text(job.read_text().replace("concurrency = 4", "concurrency = 16"))
        run = run_cli(capsys, "run", job, "--no-progress")
        assert run.code == 65, run.err
        line = [x for x in run.err.splitlines() if "changed while the job ran" in x]
        assert len(line) == 1 and str(inp) in line[0] and "every finished row is kept" in line[0]
        assert "Traceback" not in run.err
        sent = server.requests
        assert 5 < sent < n
        assert len(rows_of(outp)) == sent  # every request answered is a row on disk
        assert "stopped early" in run.out

        inp.write_bytes(original)  # the input as it was: the rerun finishes the job
        run = run_cli(capsys, "run", job, "--no-progress")
        assert run.code == 0, run.err
        assert server.requests == n
    assert sorted(r["id"] for r in rows_of(outp)) == [f"p{i:04d}" for i in range(n)]


# -- waits have a ceiling ----------------------------------------------------------------

WHEN = r"until \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC"


@pytest.mark.parametrize(("status", "headers", "what"), [
    (429, {"retry-after": "86400"}, r"86,400 s \(24\.0 h\) \(Retry-After, "),
    (503, {"retry-after": "86400"}, r"86,400 s \(24\.0 h\) \(Retry-After, "),
    (200, {"x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "0",
           "x-ratelimit-reset-requests": "264h"}, r"950,400 s \(264\.0 h\) \(x-ratelimit-reset, "),
], ids=["429-retry-after", "503-retry-after", "reset-eleven-days-away"])
def test_a_wait_past_outage_s_stops_the_job_at_once_naming_the_reset_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, headers: dict[str, str], what: str
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    outp = tmp_path / "out.parquet"

    def answer(n: int, body: dict[str, Any]) -> Answer:
        if n < 10:
            return ok()
        if status == 200:
            return 200, {"content-type": "application/json", **headers}, ok()[2]
        return status, {"content-type": "application/json", **headers}, b'{"error": {"message": "later"}}'

    with HostileServer(answer) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, outp, server.base_url), "--no-progress")
        assert server.requests < 40  # it did not grind through the input, and did not sleep for days
    assert run.code == 3, run.err
    assert re.search(rf"the server asked to wait {what}{WHEN}\), past retry\.outage_s \(300 s\): stopping; "
                     rf"rows already finished are kept, rerun the same command after \d{{4}}-", run.err), run.err
    assert "Traceback" not in run.err
    rows = rows_of(outp)
    # every finished row is kept: the first 10 answers were good, less the few (at most the
    # concurrency, 4) still in flight when the stop cancelled them; a 200 carrying the reset is good too
    assert 10 - 4 <= sum(r["status"] == "ok" for r in rows) <= (10 if status != 200 else 10 + 4)


async def test_a_wait_past_max_wait_s_is_announced_taken_and_logged_as_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import anyio
    import httpx

    from batch.runner import RunOptions, run_job
    from batch.spec_load import load_job

    class FakeTime:
        def __init__(self) -> None:
            self.now = 0.0

        def clock(self) -> float:
            return self.now

        async def sleep(self, seconds: float) -> None:
            self.now += seconds
            await anyio.lowlevel.checkpoint()

    fake = FakeTime()
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(fake.now)
        if len(sent_at) == 1:
            return httpx.Response(429, headers={"retry-after": "120"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, content=ok()[2], headers={"content-type": "application/json"})

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    spec = load_job(None, {
        "input.path": str(inp), "output.path": str(tmp_path / "out.parquet"), "api.base_url": "http://127.0.0.1:9/v1",
        "request.model": "m", "limits.concurrency": 1, "retry.max_wait_s": 60.0, "retry.outage_s": 300.0,
        "retry.initial_wait_s": 0.0,
    })
    opts = RunOptions(transport=httpx.MockTransport(handler), sleep=fake.sleep, clock=fake.clock,
                      handle_signals=False, progress=False)
    with caplog.at_level(logging.INFO):
        summary = await run_job(spec, opts)
    assert summary.rows_ok == 3
    assert sent_at[1] >= 120.0  # the wait the server asked for was taken, not cut short
    announced = [r.getMessage() for r in caplog.records if "asked to wait" in r.getMessage()]
    assert len(announced) == 1
    assert re.fullmatch(rf"the server asked to wait 120 s \(2\.0 min\) \(Retry-After, {WHEN}\), longer than "
                        r"retry\.max_wait_s \(60 s\): waiting for it, with a line every 60 s; a wait past "
                        r"retry\.outage_s \(300 s\) would stop the job", announced[0])
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 1
    waited = float(re.search(r"retrying in ([\d.]+) s", retried[0]).group(1))  # type: ignore[union-attr]
    assert 120.0 <= waited <= 121.0  # the wait actually taken, not the jitter before it


def test_an_input_that_changes_before_anything_is_sent_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch.sources import JsonlSource

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    check = JsonlSource.check

    def check_then_append(self: JsonlSource) -> None:
        check(self)
        with open(inp, "a") as f:  # another program appends just after the input was checked
            f.write(json.dumps({"id": "late", "prompt": "x"}) + "\n")

    monkeypatch.setattr(JsonlSource, "check", check_then_append)
    with HostileServer(lambda n, b: ok()) as server:
        run = run_cli(capsys, "run", job_toml(tmp_path, inp, tmp_path / "out.parquet", server.base_url),
                      "--no-progress")
        assert server.requests == 0
    assert run.code == 2
    assert f"{inp}: the input changed while the job read it (" in run.err and "nothing was sent" in run.err
