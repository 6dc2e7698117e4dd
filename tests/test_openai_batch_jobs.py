"""OpenAI batch files and embeddings with the rest of a job: variant columns, budget, summary, sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from batch.simulator.embeddings import vector
from tests.helpers import prompts, run_cli, write_jsonl
from tests.test_openai_batch import SAMPLE, batch_args, check_line, read_lines


def _line(custom_id: str, model: str, url: str = "/v1/embeddings") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if url == "/v1/embeddings":
        body["input"] = f"some text for {custom_id}"
    else:
        body["messages"] = [{"role": "user", "content": f"question {custom_id}"}]
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_the_batch_output_has_one_line_per_custom_id_and_the_summary_names_it(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outp, errp = tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    custom_ids = sorted(json.loads(line)["custom_id"] for line in SAMPLE.read_text().splitlines())
    for attempt in range(2):  # the rerun sends nothing and writes the same file
        result = run_cli(capsys, *batch_args(sim, SAMPLE, outp, "--error-file", str(errp)))
        assert result.code == 0, result.err
        lines = read_lines(outp)
        for line in lines:
            check_line(line)
        assert sorted(line["custom_id"] for line in lines) == custom_ids, attempt
        assert read_lines(errp) == []
        # the summary's output line names the batch output file, and the JSON summary lists both files
        text = result.out + result.err
        assert f"output    {outp}, failed lines in {errp}" in text
        doc = json.loads(outp.with_name("res.parquet.summary.json").read_text())
        assert doc["batch_files"] == [str(outp), str(errp)]
    # the Parquet store carries the variant columns: a batch file job is a plain job, one variant, one sample
    table = pq.read_table(outp.with_suffix(".parquet"), columns=["id", "variant", "sample"]).to_pylist()
    assert sorted(r["id"] for r in table) == custom_ids
    assert {(r["variant"], r["sample"]) for r in table} == {("default-model", 0)}


def test_embeddings_under_a_budget_reserve_no_answer_tokens_and_cost_their_prompt(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = prompts(150)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outp = tmp_path / "out.parquet"
    job = tmp_path / "job.toml"
    # were an answer reserved (max_tokens 16 at $1,000 per million), each row's worst case ($0.016)
    # would pass the whole $0.01 budget and nothing would be sent
    job.write_text(f'[input]\npath = "{inp}"\nembed_batch = 8\n[output]\npath = "{outp}"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\nendpoint = "embeddings"\n'
                   '[request]\nmodel = "embedder"\nmax_tokens = 16\n[limits]\nbudget_usd = 0.01\n'
                   '[pricing."embedder"]\ninput = 1.0\noutput = 1000.0\n')
    result = run_cli(capsys, "run", str(job), "--no-progress")
    assert result.code == 0, result.err
    table = pq.read_table(outp).to_pylist()
    assert len(table) == 150 and all(r["status"] == "ok" for r in table)
    for r in table:
        assert r["completion_tokens"] == 0 and r["cost_usd"] == pytest.approx(r["prompt_tokens"] * 1.0 / 1e6)
    doc = json.loads(outp.with_name("out.parquet.summary.json").read_text())
    assert doc["budget"]["spent_usd"] == pytest.approx(sum(r["cost_usd"] for r in table))
    assert doc["budget"]["spent_usd"] == pytest.approx(sim.stats["prompt_tokens"] / 1e6)


def test_a_batch_file_under_a_budget_prices_each_line_by_its_model(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [
        _line("chat-0", "m", "/v1/chat/completions"), _line("embed-0", "e2"), _line("embed-1", "nobody-priced")])
    outp = tmp_path / "res.jsonl"
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\n[output]\npath = "{outp}"\nformat = "openai_batch"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\n[request]\nmodel = "m"\nmax_tokens = 16\n'
                   '[limits]\nbudget_usd = 1.0\n[retry]\nmax_attempts = 1\n'
                   '[pricing."m"]\ninput = 1.0\noutput = 2.0\n[pricing."e2"]\ninput = 7.0\noutput = 7.0\n')
    result = run_cli(capsys, "run", str(job), "--no-progress", "--max-failed-fraction", "1")
    assert result.code == 0, result.err
    by_id = {r["id"]: r for r in pq.read_table(outp.with_suffix(".parquet")).to_pylist()}
    assert by_id["embed-0"]["cost_usd"] == pytest.approx(by_id["embed-0"]["prompt_tokens"] * 7.0 / 1e6)
    chat = by_id["chat-0"]
    assert chat["cost_usd"] == pytest.approx((chat["prompt_tokens"] * 1.0 + chat["completion_tokens"] * 2.0) / 1e6)
    # a line whose model has no price cannot be bounded: it alone is not sent, and says why
    assert by_id["embed-1"]["status"] == "failed" and by_id["embed-1"]["error_code"] == "unpriced"
    assert "'nobody-priced' has no price" in by_id["embed-1"]["error"]
    assert sim.stats["requests"] == 2
    failed = [line for line in read_lines(outp) if line["error"] is not None]
    assert [line["custom_id"] for line in failed] == ["embed-1"]


@pytest.mark.parametrize("batch_side", ["input", "output"])
def test_a_sweep_over_a_batch_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], batch_side: str
) -> None:
    inp = SAMPLE if batch_side == "input" else write_jsonl(tmp_path / "in.jsonl", prompts(3))
    output = f'path = "{tmp_path / "res.jsonl"}"\nformat = "openai_batch"\n' if batch_side == "output" \
        else f'path = "{tmp_path / "res.parquet"}"\n'
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\n[output]\n{output}'
                   '[api]\nbase_url = "simulator"\n[request]\nmodel = "m"\n'
                   '[[sweep.variant]]\nname = "a"\n[[sweep.variant]]\nname = "b"\ntemperature = 0.5\n')
    result = run_cli(capsys, "run", str(job), "--no-progress")
    assert result.code == 2
    assert "a [sweep] cannot run over an OpenAI batch file" in result.err
    assert "key 'sweep'" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "res.jsonl").exists() and not (tmp_path / "res.parquet").exists()


def test_a_sweep_of_embedding_models_groups_rows_per_variant(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(embedding_dim=8)
    rows = prompts(20)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outp = tmp_path / "out.parquet"
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\nembed_batch = 8\n[output]\npath = "{outp}"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\nendpoint = "embeddings"\n[request]\nmodel = "a"\n'
                   '[sweep.grid]\nmodel = ["a", "b"]\n')
    result = run_cli(capsys, "run", str(job), "--no-progress")
    assert result.code == 0, result.err
    assert sim.stats["requests"] == 6  # 8 + 8 + 4 rows a variant: one model a request
    table = pq.read_table(outp).to_pylist()
    assert len(table) == 40
    text = {r["id"]: r["prompt"] for r in rows}
    for r in table:
        assert r["model"] == r["variant"].removeprefix("model=")
        assert r["embedding"] == pytest.approx(vector(r["model"], text[r["id"]], 8))
