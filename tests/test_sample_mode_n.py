"""sample_mode = "n": one request with n = samples, one output row per choice."""

from __future__ import annotations

import collections
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from batch.variants import sample_seed
from batch.wire import StreamAssembler, parse_completion
from tests.helpers import run_cli
from tests.sweep_output import ROWS, sweep_job


def _body(choices: list[dict[str, object]]) -> bytes:
    return orjson.dumps({"id": "x", "model": "m", "choices": choices,
                         "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}})


def test_a_json_answer_keeps_every_choice_only_when_asked() -> None:
    body = _body([{"index": i, "message": {"role": "assistant", "content": f"answer {i}"},
                   "finish_reason": "stop" if i else "length"} for i in range(3)])
    plain = parse_completion(body, "chat")
    assert plain.text == "answer 0" and plain.more == ()
    asked = parse_completion(body, "chat", 3)
    assert asked.text == "answer 0" and asked.finish_reason == "length"
    assert [(c.text, c.finish_reason) for c in asked.more if c] == [("answer 1", "stop"), ("answer 2", "stop")]
    # a choice the server did not send is None, in its place
    short = parse_completion(_body([{"index": 0, "text": "a"}, {"index": 2, "text": "c"}]), "completions", 3)
    assert short.more[0] is None and short.more[1] is not None and short.more[1].text == "c"


def test_a_stream_assembles_every_choice_when_asked() -> None:
    events = [{"choices": [{"index": i % 3, "delta": {"content": f"{'abc'[i % 3]}{i // 3}"}, "finish_reason": None}]}
              for i in range(6)]
    events += [{"choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]} for i in range(3)]
    assembled = []
    for n in (1, 3):
        stream = StreamAssembler("chat", n=n)
        for e in events:
            stream.feed(orjson.dumps(e).decode())
        stream.feed("[DONE]")
        assembled.append(stream.finish())
    assert assembled[0].text == "a0a1" and assembled[0].more == ()
    assert assembled[1].text == "a0a1"
    assert [(c.text, c.finish_reason) for c in assembled[1].more if c] == [("b0b1", "stop"), ("c0c1", "stop")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_sweep_in_n_mode_sends_one_request_per_row_and_variant_and_writes_a_row_per_choice(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], stream: bool) -> None:
    job = sweep_job(tmp_path, sim)
    text = job.read_text().replace("[sweep]\n", '[sweep]\nsample_mode = "n"\n')
    job.write_text(text.replace("[api]\n", "[api]\nstream = true\n") if stream else text)
    run = run_cli(capsys, "run", job, "--no-progress")
    assert run.code == 0, run.err
    seen = sim.stats["params_seen"]
    assert len(seen) == len(ROWS) * 4  # 2 models x 2 temperatures, once each
    assert {b["n"] for b in seen} == {3}
    assert collections.Counter(b["seed"] for b in seen) == collections.Counter(
        sample_seed(r["id"], 0) for r in ROWS for _ in range(4))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len({(r["id"], r["variant"], r["sample"]) for r in rows}) == len(rows) == len(ROWS) * 12
    assert {r["status"] for r in rows} == {"ok"}
    # the request's usage is shared out: the rows add up to what the simulator counted
    assert sum(r["prompt_tokens"] for r in rows) == sim.stats["prompt_tokens"]
    assert sum(r["completion_tokens"] for r in rows) == sim.stats["completion_tokens"]
    by_request = collections.defaultdict(list)
    for r in rows:
        by_request[(r["id"], r["variant"])].append(r)
    assert all(sorted(x["sample"] for x in group) == [0, 1, 2] for group in by_request.values())
    # a rerun asks nothing: sample 0 done means all three are
    assert run_cli(capsys, "run", job, "--no-progress").code == 0
    assert len(sim.stats["params_seen"]) == len(ROWS) * 4


def test_a_plan_of_an_n_mode_sweep_counts_one_request_per_row_and_variant_and_a_row_per_sample(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    job = sweep_job(tmp_path, sim)
    job.write_text(job.read_text().replace("[sweep]\n", '[sweep]\nsample_mode = "n"\n'))
    plan = run_cli(capsys, "plan", job, "--json", "-")
    assert plan.code == 0, plan.err
    doc = orjson.loads(plan.out)
    assert sim.stats["requests"] == 0
    assert {(v["rows_to_send"], v["requests_to_send"]) for v in doc["variants"]} == {(len(ROWS) * 3, len(ROWS))}
    # the answer's ceiling is max_tokens x n, once per request
    assert {v["output_tokens_ceiling"] for v in doc["variants"]} == {len(ROWS) * 16 * 3}
    assert run_cli(capsys, "run", job, "--no-progress").code == 0
    assert len(sim.stats["params_seen"]) == sum(v["requests_to_send"] for v in doc["variants"])
    again = orjson.loads(run_cli(capsys, "plan", job, "--json", "-").out)
    assert {(v["rows_to_send"], v["rows_done"], v["requests_to_send"]) for v in again["variants"]} == \
        {(0, len(ROWS) * 3, 0)}


@pytest.mark.parametrize(("section", "key", "said"), [
    ("[output.schema]\ntype = \"object\"\n", "sweep.sample_mode", "a schema checks one answer a request"),
    ("", "endpoint", "the embeddings endpoint answers one vector a text"),
])
def test_n_mode_with_a_schema_or_embeddings_is_refused_in_one_line(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], section: str, key: str,
        said: str) -> None:
    job = sweep_job(tmp_path, sim)
    text = job.read_text().replace("[sweep]\n", '[sweep]\nsample_mode = "n"\n')
    text = text.replace("[api]\n", f"{section}[api]\n" if section else '[api]\nendpoint = "embeddings"\n')
    job.write_text(text)
    result = run_cli(capsys, "run", job, "--no-progress")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err
    assert said in lines[0] and key in lines[0] and "job.toml" in lines[0]
    assert sim.stats["requests"] == 0 and not (tmp_path / "out.parquet").exists()
