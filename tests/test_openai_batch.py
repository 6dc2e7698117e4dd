"""OpenAI batch files in and out, and embeddings, end to end against the simulator.

Every output line is checked against the batch output shape (a JSON schema written
from the API reference: the SDK has no type for the line itself) and its body with
the ``openai`` SDK's own response types.
"""

from __future__ import annotations

import base64
import json
import signal
import struct
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batch.embed_group import split_usage
from batch.records import Usage
from batch.simulator import SimServer
from batch.simulator.embeddings import vector
from batch.wire_embed import parse_embeddings
from tests.helpers import prompts, run_cli, write_jsonl
from tests.test_resume import requests, run, start, wait_for

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "batch_requests.jsonl"

# https://platform.openai.com/docs/api-reference/batch/request-output
LINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "custom_id": {"type": "string"},
        "response": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["status_code", "request_id", "body"], "additionalProperties": False,
            "properties": {"status_code": {"type": "integer"}, "request_id": {"type": "string"},
                           "body": {"type": "object"}},
        }]},
        "error": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }]},
    },
}
BODY_TYPES = {"chat": ChatCompletion, "completion": Completion, "embed": CreateEmbeddingResponse}


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_line(line: dict[str, Any]) -> None:
    """The batch output shape, and the body as the SDK reads it."""
    jsonschema.validate(line, LINE_SCHEMA)
    assert (line["response"] is None) != (line["error"] is None)
    if line["response"] is not None:
        kind = line["custom_id"].split("-")[0]
        raw = line["response"]["body"]
        if kind == "embed":  # the SDK decodes base64 vectors before its type sees them: so do we
            raw = {**raw, "data": [{**d, "embedding": _floats(d["embedding"])} for d in raw["data"]]}
        body = BODY_TYPES[kind].model_validate(raw)
        assert body.usage is not None and body.usage.prompt_tokens > 0


def _floats(value: Any) -> list[float]:
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(value)


def batch_args(sim: SimServer, inp: Path, outp: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--output", str(outp), "--output-format", "openai_batch",
            "--base-url", sim.base_url, "--model", "default-model", "--no-progress", *extra]


def test_a_mixed_batch_file_gives_openai_batch_output_and_the_same_results_in_parquet(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(embedding_dim=12)
    outp = tmp_path / "out" / "results.jsonl"
    result = run_cli(capsys, *batch_args(sim, SAMPLE, outp))
    assert result.code == 0, result.err
    sent = {json.loads(line)["custom_id"]: json.loads(line) for line in SAMPLE.read_text().splitlines()}
    lines = read_lines(outp)
    for line in lines:
        check_line(line)
    assert sorted(line["custom_id"] for line in lines) == sorted(sent)
    assert len({line["id"] for line in lines}) == len(lines)
    assert all(line["response"]["status_code"] == 200 for line in lines)
    # the body is the server's answer to the line's own body: its model, and a vector per input
    for line in lines:
        body, asked = line["response"]["body"], sent[line["custom_id"]]["body"]
        assert body["model"] == asked["model"]
        if line["custom_id"].startswith("embed"):
            inputs = asked["input"] if isinstance(asked["input"], list) else [asked["input"]]
            assert len(body["data"]) == len(inputs)

    # the Parquet output beside it holds the same results
    table = pq.read_table(outp.with_suffix(".parquet")).to_pylist()
    by_id = {row["id"]: row for row in table}
    assert set(by_id) == set(sent)
    for line in lines:
        row, body = by_id[line["custom_id"]], line["response"]["body"]
        assert row["status"] == "ok" and row["prompt_tokens"] == body["usage"]["prompt_tokens"]
        assert row["model"] == body["model"]
        if "choices" in body:
            choice = body["choices"][0]
            assert row["text"] == (choice["message"]["content"] if "message" in choice else choice["text"])
            assert row["endpoint"] == ("chat" if "message" in choice else "completions")
    embed = by_id["embed-0"]
    assert embed["endpoint"] == "embeddings" and embed["completion_tokens"] == 0
    assert embed["embedding"] == pytest.approx(vector(sent["embed-0"]["body"]["model"], sent["embed-0"]["body"]["input"], 12))
    # the job's max_tokens fills the gap of a chat line that sets none... and never overrides one that does
    assert by_id["chat-0"]["completion_tokens"] <= sent["chat-0"]["body"]["max_tokens"]


def test_bad_lines_fail_only_themselves_and_go_to_the_error_file(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"custom_id": "chat-ok", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    inp = write_jsonl(tmp_path / "in.jsonl", [
        good,
        {**good, "custom_id": "chat-get", "method": "GET"},
        {**good, "custom_id": "chat-url", "url": "/v1/responses"},
        {"custom_id": "embed-ok", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": "x"}},
    ])
    with inp.open("a") as f:
        f.write("{not json\n")
    # rejected by the server: an answer of 400 fails the line, not the job (its own max_tokens
    # wins over the job's 16, which fits)
    sim.configure(context_tokens=50)
    write = {**good, "custom_id": "chat-long", "body": {**good["body"], "max_tokens": 100}}
    with inp.open("a") as f:
        f.write(json.dumps(write) + "\n")

    outp, errp = tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    # abort mode (the default) refuses the file before anything is sent
    result = run_cli(capsys, *batch_args(sim, inp, outp))
    assert result.code == 2 and "line 2" in result.err and "method must be POST" in result.err
    assert requests(sim) == 0

    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\non_bad_line = "fail_row"\n[output]\npath = "{outp}"\n'
                   f'format = "openai_batch"\nerror_file = "{errp}"\n[api]\nbase_url = "{sim.base_url}"\n'
                   '[request]\nmodel = "m"\nmax_tokens = 16\n[retry]\nmax_attempts = 1\n')
    result = run_cli(capsys, "run", str(job), "--no-progress", "--max-failed-fraction", "1")
    assert result.code == 0, result.err
    ok, failed = read_lines(outp), read_lines(errp)
    for line in ok + failed:
        check_line(line)
    assert sorted(line["custom_id"] for line in ok) == ["chat-ok", "embed-ok"]
    errors = {line["custom_id"]: line["error"] for line in failed}
    assert set(errors) == {"chat-get", "chat-url", "<line 5>", "chat-long"}
    assert all(line["response"] is None for line in failed)
    assert errors["chat-get"]["code"] == "bad_input" and "method must be POST" in errors["chat-get"]["message"]
    assert "/v1/responses" in errors["chat-url"]["message"]
    assert "line 5" in errors["<line 5>"]["message"]
    assert "context" in errors["chat-long"]["message"]


def test_kill_and_rerun_gives_every_custom_id_once(sim: SimServer, tmp_path: Path) -> None:
    n = 600
    sim.configure(latency_ms=20)
    kinds = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    lines = []
    for i in range(n):
        url = kinds[i % 3]
        body: dict[str, Any] = {"model": "m"}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": f"question {i}"}]
        elif url.endswith("/completions"):
            body["prompt"] = f"prompt {i}"
        else:
            body["input"] = f"text {i}"
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    outp = tmp_path / "out" / "res.jsonl"
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "{inp}"
[output]
path = "{outp}"
format = "openai_batch"
flush_rows = 20
flush_s = 0.2
[api]
base_url = "{sim.base_url}"
[request]
model = "m"
max_tokens = 16
[limits]
concurrency = 8
""")
    proc = start(job)
    wait_for(lambda: requests(sim) >= 150, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert not outp.exists()
    code, _, err = run(job)
    assert code == 0, err
    got = read_lines(outp)
    for line in got:
        assert line["response"] is not None, line
        jsonschema.validate(line, LINE_SCHEMA)
    assert sorted(line["custom_id"] for line in got) == sorted(f"req-{i}" for i in range(n))
    assert requests(sim) <= n + 8 + 20


def test_embeddings_rows_are_batched_with_their_dimension_and_usage(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(embedding_dim=24)
    rows = prompts(150)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outp = tmp_path / "out.parquet"
    result = run_cli(capsys, "run", "--input", str(inp), "--output", str(outp), "--base-url", sim.base_url,
                     "--model", "embedder", "--endpoint", "embeddings", "--embed-batch", "64", "--no-progress")
    assert result.code == 0, result.err
    assert sim.stats["requests"] == 3  # 64 + 64 + 22
    table = pq.read_table(outp)
    kind = table.schema.field("embedding").type
    assert pa.types.is_list(kind) and kind.value_type == pa.float32()
    out = {row["id"]: row for row in table.to_pylist()}
    assert set(out) == {r["id"] for r in rows}
    for r in rows:
        row = out[r["id"]]
        assert row["status"] == "ok" and len(row["embedding"]) == 24
        assert row["embedding"] == pytest.approx(vector("embedder", r["prompt"], 24))
        assert row["completion_tokens"] == 0 and row["prompt_tokens"] == row["total_tokens"]
    # the requests' usage, split over their rows, adds up to what the server counted
    assert sum(row["prompt_tokens"] for row in out.values()) == sim.stats["prompt_tokens"]


def test_base64_vectors_are_decoded_and_usage_is_split_by_estimated_tokens() -> None:
    values = [0.5, -1.25, 3.0]
    body = {"object": "list", "model": "e", "usage": {"prompt_tokens": 7, "total_tokens": 7},
            "data": [{"index": 1, "embedding": [1, 2.5]},
                     {"index": 0, "embedding": base64.b64encode(struct.pack("<3f", *values)).decode()}]}
    parsed = parse_embeddings(json.dumps(body).encode())
    assert parsed.vectors == [values, [1.0, 2.5]]
    assert parsed.usage == Usage(prompt_tokens=7, completion_tokens=0, total_tokens=7)
    shares = split_usage(Usage(10, 0, 10), [1, 3, 6])
    assert [u.prompt_tokens for u in shares if u] == [1, 3, 6]
    shares = split_usage(Usage(7, 0, 7), [5, 5, 5])
    assert sum(u.prompt_tokens for u in shares if u) == 7


def test_a_batch_file_is_detected_by_its_first_line(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outp = tmp_path / "out.parquet"
    result = run_cli(capsys, "run", "--input", str(SAMPLE), "--output", str(outp), "--base-url", sim.base_url,
                     "--model", "m", "--no-progress")
    assert result.code == 0, result.err
    ids = pq.read_table(outp, columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(json.loads(line)["custom_id"] for line in SAMPLE.read_text().splitlines())


def test_an_openai_batch_output_needs_a_jsonl_path(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, *batch_args(sim, SAMPLE, tmp_path / "res.parquet"))
    assert result.code == 2 and "output.path" in result.err and ".jsonl" in result.err
    result = run_cli(capsys, "run", "--input", str(SAMPLE), "--output", str(tmp_path / "r.parquet"),
                     "--error-file", str(tmp_path / "e.jsonl"), "--base-url", sim.base_url, "--model", "m")
    assert result.code == 2 and "output.error_file" in result.err
