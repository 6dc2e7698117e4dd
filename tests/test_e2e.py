"""The whole job through the CLI, against the simulator on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.prompts import RequestBuilder
from batch.simulator import SimServer, count_prompt_tokens, reply_for
from batch.sources import open_source
from batch.spec_load import load_job
from tests.helpers import prompts, run_cli, write_jsonl, write_parquet

RESULT_TYPES = {
    "model": pa.string(), "endpoint": pa.string(), "status": pa.string(), "text": pa.string(),
    "finish_reason": pa.string(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(), "cached_tokens": pa.int64(), "reasoning_tokens": pa.int64(),
    "cost_usd": pa.float64(), "latency_s": pa.float64(), "ttft_s": pa.float64(), "attempts": pa.int32(),
    "http_status": pa.int32(), "error_code": pa.string(), "error": pa.string(), "response_id": pa.string(),
    "created": pa.timestamp("us", tz="UTC"), "system_fingerprint": pa.string(),
}

MODEL = "simulator-small"


def job_args(sim: SimServer, inp: Path, outp: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--output", str(outp), "--base-url", sim.base_url,
            "--model", MODEL, "--no-progress", *extra]


def expected(inp: Path, outp: Path, sim: SimServer, endpoint: str, *, max_tokens: int = 256) -> dict[str, tuple[str, int, int]]:
    """What the simulator answers for each row: id -> (text, prompt tokens, completion tokens)."""
    spec = load_job(None, {"input.path": str(inp), "output.path": str(outp), "api.base_url": sim.base_url,
                           "request.model": MODEL, "api.endpoint": endpoint, "request.max_tokens": max_tokens})
    builder = RequestBuilder(spec)
    want = {}
    for batch in open_source(spec.input).batches():
        for row in batch:
            body = builder.build(row).body
            text, completion_tokens, _ = reply_for(body)
            want[row.id] = (text, count_prompt_tokens(body), completion_tokens)
    return want


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_job_end_to_end(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, endpoint: str, stream: bool
) -> None:
    rows = prompts(40)
    inp = tmp_path / f"in.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(inp, rows)  # type: ignore[operator]
    outp = tmp_path / "out" / "res.parquet"
    if not stream:
        sim.configure(stream_done=False)  # irrelevant without streaming; proves nothing depends on it
    run = run_cli(capsys, *job_args(sim, inp, outp, "--endpoint", endpoint,
                                    "--stream" if stream else "--no-stream", "--concurrency", "8"))
    assert run.code == 0, run.err

    table = pq.read_table(outp)
    assert table.num_rows == 40
    assert sorted(table["id"].to_pylist()) == [r["id"] for r in rows]
    for name, typ in RESULT_TYPES.items():
        assert table.schema.field(name).type == typ, name
    assert table.column_names[:1] == ["id"]
    got = {r["id"]: r for r in table.to_pylist()}
    want = expected(inp, outp, sim, endpoint)
    for rid, (text, p_tokens, c_tokens) in want.items():
        row = got[rid]
        assert row["status"] == "ok"
        assert row["text"] == text
        assert (row["prompt_tokens"], row["completion_tokens"]) == (p_tokens, c_tokens)
        assert row["total_tokens"] == p_tokens + c_tokens
        assert row["endpoint"] == endpoint and row["model"] == MODEL
        assert row["attempts"] == 1 and row["http_status"] == 200
        assert row["created"] is not None and row["response_id"]
        assert row["cost_usd"] > 0
        assert (row["ttft_s"] is not None) == stream

    summary = json.loads((outp.parent / "res.parquet.summary.json").read_text())
    stats = sim.stats
    assert summary["rows_ok"] == 40 and summary["rows_failed"] == 0
    assert summary["totals"]["prompt_tokens"] == sum(w[1] for w in want.values()) == stats["prompt_tokens"]
    assert summary["totals"]["completion_tokens"] == sum(w[2] for w in want.values()) == stats["completion_tokens"]
    assert summary["totals"]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in got.values()))
    assert stats["requests"] == 40
    assert "40 ok, 0 failed" in run.out


def test_atoma_style_stream_end_and_usage_in_every_chunk(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(stream_done=False, usage_every_chunk=True, keepalive=True)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    outp = tmp_path / "res.parquet"
    run = run_cli(capsys, *job_args(sim, inp, outp, "--stream"))
    assert run.code == 0, run.err
    table = pq.read_table(outp)
    assert table["status"].to_pylist() == ["ok"] * 10
    assert pq.read_table(outp)["completion_tokens"].null_count == 0


def test_max_tokens_is_sent_and_cut_answers_say_length(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    outp = tmp_path / "res.parquet"
    run = run_cli(capsys, *job_args(sim, inp, outp, "--max-tokens", "3"))
    assert run.code == 0, run.err
    table = pq.read_table(outp)
    assert set(table["finish_reason"].to_pylist()) == {"length"}
    assert max(table["completion_tokens"].to_pylist()) == 3


def test_sample_job_runs_on_its_own_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    outp = tmp_path / "sample.parquet"
    run = run_cli(capsys, "run", "jobs/sample.toml", "--output", outp, "--no-progress")
    assert run.code == 0, run.err
    table = pq.read_table(outp)
    assert table.num_rows == 50
    assert set(table["status"].to_pylist()) == {"ok"}
    assert "topic" in table.column_names
    assert "50 ok, 0 failed" in run.out


def test_job_file_is_optional_and_defaults_to_id_and_prompt_columns(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(5)])
    outp = tmp_path / "res.parquet"
    run = run_cli(capsys, *job_args(sim, inp, outp))
    assert run.code == 0, run.err
    # no id column: the 0-based row number is the id
    assert sorted(pq.read_table(outp)["id"].to_pylist()) == ["0", "1", "2", "3", "4"]


def test_unpriced_model_gets_null_cost_and_a_warning(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    outp = tmp_path / "res.parquet"
    args = job_args(sim, inp, outp)
    args[args.index(MODEL)] = "some/unpriced-model"
    run = run_cli(capsys, *args)
    assert run.code == 0, run.err
    assert pq.read_table(outp)["cost_usd"].null_count == 3
    assert "no price for model 'some/unpriced-model'" in run.err
