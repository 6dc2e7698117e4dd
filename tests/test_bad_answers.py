"""Bad answers from the server through a whole job: the row is retried or fails, the job goes on.

The runner is driven in-process with an ``httpx.MockTransport`` that answers
each row in its own way (the row's number is in its prompt), so one job sees
every kind of bad answer at once, next to rows that are answered well.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pyarrow.parquet as pq
import pytest

from batch.runner import RunOptions, run_job
from batch.simulator import SimServer
from batch.spec import JobSpec
from batch.spec_load import load_job
from tests.helpers import prompts, write_jsonl

MAX_ATTEMPTS = 3


async def no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


def make_spec(tmp_path: Path, n: int, *, stream: bool, base_url: str = "http://127.0.0.1:9/v1",
              **overrides: Any) -> JobSpec:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    return load_job(None, {
        "input.path": str(inp), "output.path": str(tmp_path / "out.parquet"),
        "api.base_url": base_url, "request.model": "m", "api.stream": stream,
        "retry.max_attempts": MAX_ATTEMPTS, "retry.initial_wait_s": 0.0, "retry.max_wait_s": 0.0,
        "limits.concurrency": 4, **overrides,
    })


def good_json(text: str = "fine") -> dict[str, Any]:
    return {
        "id": "cmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


def sse(*events: bytes | dict[str, Any]) -> bytes:
    out = b""
    for event in events:
        out += event if isinstance(event, bytes) else b"data: " + orjson.dumps(event) + b"\n\n"
    return out


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if content is None and finish is None else [
        {"index": 0, "delta": {"content": content or ""}, "finish_reason": finish}
    ]
    out: dict[str, Any] = {"id": "c-1", "object": "chat.completion.chunk", "created": 1700000000,
                           "model": "m", "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


GOOD_STREAM = sse(chunk("fine"), chunk(finish="stop"),
                  chunk(usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}), b"data: [DONE]\n\n")


async def megabytes(n: int) -> AsyncIterator[bytes]:
    block = b" " * 2**20
    for _ in range(n):
        yield block


def json_with_megabytes_of_text(mb: int) -> bytes:
    return orjson.dumps(good_json("x" * (mb * 2**20)))


async def endless_stream() -> AsyncIterator[bytes]:
    yield sse(chunk("starting"))
    while True:  # keep-alive comments forever: only the per-request total limit ends it
        await anyio.sleep(0.01)
        yield b": keep-alive\n\n"


Answer = Callable[[], httpx.Response]

# row number -> (what the server answers, every attempt), what the row's error must say
JSON_CASES: dict[str, tuple[Answer, str]] = {
    "html_200": (lambda: httpx.Response(200, content=b"<html><title>Oops</title><body>Error</body></html>",
                                        headers={"content-type": "text/html"}), "not valid JSON: '<html>"),
    "html_502": (lambda: httpx.Response(502, content=b"<html><head><title>502 Bad Gateway</title></head></html>",
                                        headers={"content-type": "text/html"}), "HTTP 502: 502 Bad Gateway"),
    "invalid_json": (lambda: httpx.Response(200, content=b'{"choices": [{"message": '), "not valid JSON"),
    "not_an_object": (lambda: httpx.Response(200, json=[1, 2, 3]), "not a JSON object"),
    "no_choices": (lambda: httpx.Response(200, json={"id": "x", "object": "chat.completion"}), "no choices list"),
    "empty_choices": (lambda: httpx.Response(200, json={**good_json(), "choices": []}), "empty choices list"),
    "usage_string": (lambda: httpx.Response(200, json={**good_json(), "usage": "lots"}), "usage is not an object"),
    "usage_tokens_string": (
        lambda: httpx.Response(200, json={**good_json(), "usage": {"prompt_tokens": "5", "completion_tokens": 1}}),
        "usage.prompt_tokens is not a token count"),
    "empty_body": (lambda: httpx.Response(200, content=b""), "empty response body"),
    "huge_body": (lambda: httpx.Response(200, content=megabytes(40)), "larger than"),
    "huge_length": (lambda: httpx.Response(200, content=json_with_megabytes_of_text(40)), "over the"),
    "error_in_200": (lambda: httpx.Response(200, json={"error": {"code": "INTERNAL", "message": "node died"}}),
                     "carries an error (INTERNAL): node died"),
    "status_400": (lambda: httpx.Response(400, json={"error": {"code": "BAD", "message": "too long"}}),
                   "HTTP 400 (BAD): too long"),
}

STREAM_CASES: dict[str, tuple[Answer, str]] = {
    "garbage_data": (lambda: httpx.Response(200, content=sse(chunk("a"), b"data: <<garbage>>\n\n"),
                                            headers={"content-type": "text/event-stream"}),
                     "stream event is not valid JSON"),
    "garbage_only": (lambda: httpx.Response(200, content=b"hello\nworld\n\n%%%%\n",
                                            headers={"content-type": "text/event-stream"}),
                     "stream ended without any answer"),
    "cut_off": (lambda: httpx.Response(200, content=sse(chunk("a"), chunk("b")),
                                       headers={"content-type": "text/event-stream"}),
                "cut off before its finish_reason or usage"),
    "empty_stream": (lambda: httpx.Response(200, content=b"", headers={"content-type": "text/event-stream"}),
                     "stream ended without any answer"),
    "endless": (lambda: httpx.Response(200, content=endless_stream(), headers={"content-type": "text/event-stream"}),
                "total timeout"),
    "huge_stream": (lambda: httpx.Response(200, content=megabytes(40), headers={"content-type": "text/event-stream"}),
                    "larger than"),
    "html_200": (lambda: httpx.Response(200, content=b"<html>Service Unavailable</html>",
                                        headers={"content-type": "text/html"}),
                 "not an event stream"),
}


class Server:
    """A MockTransport handler: row i gets ``cases[i]`` on every attempt (or the first
    ``flaky`` attempts), any other row a good answer."""

    def __init__(self, cases: list[Answer | None], *, stream: bool, flaky: int = 0) -> None:
        self.cases = cases
        self.stream = stream
        self.flaky = flaky
        self.attempts: Counter[int] = Counter()

    def row_of(self, request: httpx.Request) -> int:
        body = orjson.loads(request.content)
        match = re.search(r"fact number (\d+)", body["messages"][-1]["content"])
        assert match is not None
        return int(match.group(1))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        row = self.row_of(request)
        self.attempts[row] += 1
        answer = self.cases[row] if row < len(self.cases) else None
        if answer is not None and (not self.flaky or self.attempts[row] <= self.flaky):
            return answer()
        if self.stream:
            return httpx.Response(200, content=GOOD_STREAM, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=good_json())


async def run(spec: JobSpec, server: Server) -> dict[str, dict[str, Any]]:
    opts = RunOptions(transport=httpx.MockTransport(server), sleep=no_sleep, handle_signals=False, progress=False)
    summary = await run_job(spec, opts)
    table = pq.read_table(spec.output_path())
    rows = {r["id"]: r for r in table.to_pylist()}
    assert summary.rows_failed == sum(r["status"] == "failed" for r in rows.values())
    return rows


@pytest.mark.parametrize(("stream", "cases"), [(False, JSON_CASES), (True, STREAM_CASES)], ids=["json", "stream"])
async def test_every_bad_answer_fails_its_row_and_no_other(
    tmp_path: Path, stream: bool, cases: dict[str, tuple[Answer, str]]
) -> None:
    names = list(cases)
    # bad rows interleaved with good ones: 0 good, 1 bad, 2 good, 3 bad, ...
    answers: list[Answer | None] = []
    for name in names:
        answers += [None, cases[name][0]]
    n = len(answers) + 4
    spec = make_spec(tmp_path, n, stream=stream, **{"api.request_timeout_s": 0.5})
    server = Server(answers, stream=stream)
    rows = await run(spec, server)

    assert len(rows) == n  # every row written, none lost
    for i in range(n):
        row = rows[f"p{i:04d}"]
        if i % 2 == 0 or i >= len(answers):
            assert row["status"] == "ok", (i, row["error"])
            assert row["text"] == "fine"
            continue
        name = names[i // 2]
        want = cases[name][1]
        assert row["status"] == "failed", name
        assert want in row["error"], (name, row["error"])
        assert len(row["error"]) < 400 and "\n" not in row["error"], name  # readable: one short line
        # a 400, and a value no column can hold (the same answer again would be paid again), are not retried
        retried = name not in ("status_400", "usage_tokens_string")
        assert row["attempts"] == (MAX_ATTEMPTS if retried else 1), name
        assert server.attempts[i] == row["attempts"], name


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bad_answer_then_a_good_one_is_an_ok_row(tmp_path: Path, stream: bool) -> None:
    cases = STREAM_CASES if stream else JSON_CASES
    answers: list[Answer | None] = [
        answer for name, (answer, _) in cases.items() if name not in ("status_400", "usage_tokens_string")
    ]
    spec = make_spec(tmp_path, len(answers), stream=stream, **{"api.request_timeout_s": 0.5})
    server = Server(answers, stream=stream, flaky=1)
    rows = await run(spec, server)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {r["attempts"] for r in rows.values()} == {2}


async def test_a_body_of_many_megabytes_within_the_limit_is_read(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 2, stream=False)
    server = Server([lambda: httpx.Response(200, content=json_with_megabytes_of_text(8))], stream=False)
    rows = await run(spec, server)
    assert rows["p0000"]["status"] == "ok" and len(rows["p0000"]["text"]) == 8 * 2**20
    assert rows["p0001"]["status"] == "ok"


async def test_a_silent_server_is_bounded_by_the_read_timeout(tmp_path: Path, sim: SimServer) -> None:
    # the simulator holds every "hang" request without a byte; the read timeout ends each attempt
    sim.configure(fault_rate=0.5, faults=("hang",), hang_s=10.0, seed=3)
    spec = make_spec(tmp_path, 12, stream=True, base_url=sim.base_url,
                     **{"api.read_timeout_s": 0.2, "retry.max_attempts": 2})
    opts = RunOptions(sleep=no_sleep, handle_signals=False, progress=False)
    summary = await run_job(spec, opts)
    rows = pq.read_table(spec.output_path()).to_pylist()
    assert len(rows) == 12
    assert sim.stats["by_fault"]["hang"] > 0
    failed = [r for r in rows if r["status"] == "failed"]
    assert summary.rows_failed == len(failed)
    assert all("read timeout" in r["error"] for r in failed)
    assert any(r["status"] == "ok" and r["attempts"] == 2 for r in rows)  # a hang, then an answer


class StepClock:
    """A clock that moves ``step`` seconds each time it is read: an outage of minutes in a few rows."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def flaky(ok_every: int | None) -> Callable[[httpx.Request], httpx.Response]:
    """Refuses every connection, or answers every ``ok_every``-th request well."""
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        if ok_every and count % ok_every == 0:
            return httpx.Response(200, json=good_json())
        raise httpx.ConnectError("connection refused", request=request)

    return handler


async def test_a_server_that_stays_down_stops_the_job_after_outage_s(tmp_path: Path) -> None:
    from batch.errors import JobStopped

    n = 400
    spec = make_spec(tmp_path, n, stream=False, **{"retry.max_attempts": 1, "retry.outage_s": 60.0})
    opts = RunOptions(transport=httpx.MockTransport(flaky(None)), sleep=no_sleep, handle_signals=False,
                      progress=False, clock=StepClock(1.0))
    with pytest.raises(JobStopped, match=r"no request has succeeded for \d+ s and the last \d+ rows failed"):
        await run_job(spec, opts)
    rows = pq.read_table(spec.output_path()).to_pylist()
    assert 10 <= len(rows) < n  # stopped early; what failed before is written, for the rerun to retry
    assert {r["status"] for r in rows} == {"failed"}
    assert opts.summary is not None and opts.summary.stopped is not None


@pytest.mark.parametrize(("ok_every", "outage_s"), [(5, 60.0), (None, 1e9)], ids=["some-answers", "long-outage-s"])
async def test_a_server_that_answers_now_and_then_or_a_long_outage_s_runs_every_row(
    tmp_path: Path, ok_every: int | None, outage_s: float
) -> None:
    n = 400
    spec = make_spec(tmp_path, n, stream=False, **{"retry.max_attempts": 1, "retry.outage_s": outage_s})
    opts = RunOptions(transport=httpx.MockTransport(flaky(ok_every)), sleep=no_sleep, handle_signals=False,
                      progress=False, clock=StepClock(1.0))
    summary = await run_job(spec, opts)
    assert summary.stopped is None
    assert summary.rows_ok + summary.rows_failed == n
    assert summary.rows_ok == (n // ok_every if ok_every else 0)
