"""Structured output end to end: a schema in, answers checked and re-asked, typed columns out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.prompts import RequestBuilder
from batch.simulator import SimServer
from batch.sources import open_source
from batch.spec_load import load_job
from batch.structured import Invalid, Validator, strip_fence
from tests.helpers import prompts, run_cli, write_jsonl

QA = {
    "type": "object",
    "required": ["question", "answer", "difficulty", "tags", "source"],
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
        "count": {"type": ["integer", "null"]},
        "checked": {"type": "boolean"},
        "source": {"type": "object", "required": ["title"],
                   "properties": {"title": {"type": "string"}, "year": {"type": "integer"}}},
        "steps": {"type": "array", "items": {"type": "object", "required": ["n"], "properties": {
            "n": {"type": "integer"}, "kind": {"enum": ["add", "cut"]}}}},
    },
}


def job(tmp_path: Path, sim: SimServer, schema: dict[str, Any] | None = None, *, n: int = 30,
        output: str = "", inline: str = "") -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(n))
    if schema is not None:
        (tmp_path / "qa.json").write_text(json.dumps(schema))
    lines = [
        "[input]", f'path = "{tmp_path / "in.jsonl"}"',
        "[output]", f'path = "{tmp_path / "out.parquet"}"',
        *([f'schema_file = "{tmp_path / "qa.json"}"'] if schema is not None else []),
        output,
        inline,
        "[api]", f'base_url = "{sim.base_url}"',
        "[request]", 'model = "simulator-small"',
        "[limits]", "concurrency = 8",
        "[retry]", "initial_wait_s = 0.0",
    ]
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, str, pa.Table | None]:
    result = run_cli(capsys, "run", path, "--no-progress", *extra)
    out = path.parent / "out.parquet"
    return result.code, result.err + result.out, pq.read_table(out) if out.exists() else None


def test_schema_round_trips_into_typed_columns(sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text, table = run(capsys, job(tmp_path, sim, QA))
    assert code == 0, text
    assert table is not None and table.num_rows == 30
    parsed = table.schema.field("parsed").type
    assert pa.types.is_struct(parsed)
    t = {f.name: f for f in parsed}
    assert t["question"].type == pa.string() and not t["question"].nullable  # required
    assert t["difficulty"].type == pa.string()  # dictionary-encoded in the file
    assert t["tags"].type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert t["score"].type == pa.float64() and t["score"].nullable  # optional
    assert t["count"].type == pa.int64() and t["count"].nullable
    assert t["checked"].type == pa.bool_()
    source = t["source"].type
    assert pa.types.is_struct(source) and source.field("title").type == pa.string()
    assert source.field("year").type == pa.int64() and source.field("year").nullable
    steps = t["steps"].type
    assert pa.types.is_list(steps) and steps.value_type.field("kind").type == pa.string()
    for row in table.to_pylist():
        assert row["status"] == "ok" and row["invalid_answers"] == 0
        assert row["parsed"] == {k: row["parsed"][k] for k in t}  # every field present as a column
        answer = json.loads(row["text"])
        assert row["parsed"]["question"] == answer["question"]
        assert row["parsed"]["difficulty"] in ("easy", "medium", "hard")
        assert row["parsed"]["tags"] == answer["tags"]
        assert row["parsed"]["source"]["title"] == answer["source"]["title"]
        assert row["parsed"]["score"] == answer.get("score")


def test_flatten_puts_fields_at_the_top(sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text, table = run(capsys, job(tmp_path, sim, QA, output="flatten = true", n=5))
    assert code == 0, text
    assert table is not None and "parsed" not in table.column_names
    assert table.schema.field("question").type == pa.string()
    assert table.schema.field("difficulty").type == pa.dictionary(pa.int32(), pa.string())
    assert all(json.loads(r["text"])["answer"] == r["answer"] for r in table.to_pylist())


def test_request_carries_the_schema_the_way_the_endpoint_takes_it(sim: SimServer, tmp_path: Path) -> None:
    bodies = {}
    for endpoint, send in (("chat", True), ("completions", True), ("chat", False)):
        spec = load_job(job(tmp_path, sim, QA, output=f"send_schema = {str(send).lower()}"),
                        {"api.endpoint": endpoint})
        row = next(iter(open_source(spec.input).batches()))[0]
        bodies[(endpoint, send)] = RequestBuilder(spec).build(row)
    chat = bodies[("chat", True)].body["response_format"]
    assert chat == {"type": "json_schema", "json_schema": {"name": "job", "schema": QA, "strict": True}}
    assert bodies[("completions", True)].body["guided_json"] == QA
    plain = bodies[("chat", False)]
    assert "response_format" not in plain.body and "guided_json" not in plain.body
    # not sent, the schema still keys the row: a body without it has another fingerprint
    spec = load_job(job(tmp_path, sim, None), {})
    row = next(iter(open_source(spec.input).batches()))[0]
    assert RequestBuilder(spec).build(row).fingerprint != plain.fingerprint


def test_fenced_json_is_accepted() -> None:
    v = Validator({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}})
    assert v.parse('```json\n{"a": 1}\n```') == {"a": 1}
    assert v.parse('  ```\n{"a": 2}\n```  \n') == {"a": 2}
    assert v.parse('~~~json\n{"a": 3}\n~~~') == {"a": 3}
    assert strip_fence('Here it is: ```json\n{"a": 1}\n```') == 'Here it is: ```json\n{"a": 1}\n```'  # not all fenced
    with pytest.raises(Invalid) as caught:
        v.parse('```json\n{"a": "x"}\n```')
    assert caught.value.pointer == "/a"


def test_fenced_answers_end_to_end(sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from batch.simulator import structured as sim_structured

    plain = sim_structured.structured_reply

    def fenced(*args: Any) -> tuple[str, int, str]:
        text, tokens, finish = plain(*args)
        return f"```json\n{text}\n```", tokens, finish

    monkeypatch.setattr(sim_structured, "structured_reply", fenced)
    code, text, table = run(capsys, job(tmp_path, sim, QA, n=5))
    assert code == 0, text
    assert table is not None
    for row in table.to_pylist():
        assert row["text"].startswith("```json") and row["parsed"]["question"] and row["invalid_answers"] == 0


def test_invalid_answers_are_asked_again_counted_and_paid(sim: SimServer, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    sim.configure(invalid_output_rate=0.4)
    _, text, table = run(capsys, job(tmp_path, sim, QA, n=60, output="parse_attempts = 5"))
    assert table is not None
    rows = table.to_pylist()
    reasked = [r for r in rows if r["invalid_answers"] > 0]
    assert reasked, "at a 40% rate some answers break the schema"
    ok_single = next(r for r in rows if r["invalid_answers"] == 0 and r["status"] == "ok")
    for r in reasked:
        if r["status"] == "ok":
            assert r["attempts"] == r["invalid_answers"] + 1
            # every answer paid: the prompt was sent invalid_answers + 1 times
            assert r["prompt_tokens"] == ok_single["prompt_tokens"] * r["attempts"]
    assert sim.stats["completed"] == sum(r["attempts"] for r in rows)
    summary = json.loads((tmp_path / "out.parquet.summary.json").read_text())
    never = sum(r["error_code"] == "invalid_output" for r in rows)
    assert summary["structured"] == {"simulator-small": {"rows_reasked": len(reasked), "rows_never_valid": never}}
    assert f"{len(reasked):,} rows asked again" in text


def test_a_row_that_never_validates_fails_with_its_pointer_and_text(sim: SimServer, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sim.configure(invalid_output_rate=1.0)
    code, _, table = run(capsys, job(tmp_path, sim, QA, n=10, output="parse_attempts = 1"))
    assert code == 1
    assert table is not None
    for r in table.to_pylist():
        assert r["status"] == "failed" and r["error_code"] == "invalid_output"
        assert r["attempts"] == 2 and r["invalid_answers"] == 2  # the first answer and one re-ask
        assert r["parsed"] is None and r["text"]  # the raw text is kept
        assert r["prompt_tokens"] and r["cost_usd"] is not None  # both answers were paid
        if r["text"].endswith("}"):  # whole JSON missing a required property
            assert "at /:" in r["error"] and "must contain" in r["error"]
        else:
            assert "at /: not valid JSON" in r["error"]


@pytest.mark.parametrize(("schema", "pointer"), [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "/properties/a/type"),
    ({"type": "object", "required": "a"}, "/required"),
    ({"type": "array", "prefixItems": [{"type": "string"}]}, "/prefixItems"),
    ({"type": "object", "propertise": {}}, "/propertise"),
])
def test_a_bad_schema_file_is_refused_at_load_with_its_pointer(
        sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], schema: dict[str, Any], pointer: str) -> None:
    result = run_cli(capsys, "run", job(tmp_path, sim, schema), "--no-progress")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err
    assert str(tmp_path / "qa.json") in lines[0] and f"at JSON pointer {pointer}:" in lines[0]
    assert sim.stats["requests"] == 0


def test_a_bad_inline_schema_names_the_job_files_line(sim: SimServer, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    inline = '[output.schema]\ntype = "object"\n[output.schema.properties.a]\ntype = "strin"\n'
    path = job(tmp_path, sim, None, inline=inline)
    result = run_cli(capsys, "run", path, "--no-progress")
    assert result.code == 2
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text == 'type = "strin"')
    assert f"job.toml, line {line}, key 'output.schema.properties.a.type': at JSON pointer /properties/a/type" in result.err


def test_a_field_without_one_type_is_json_text_and_said_at_load(sim: SimServer, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    schema = {"type": "object", "required": ["v"], "properties": {"v": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}
    code, text, table = run(capsys, job(tmp_path, sim, schema, n=3))
    assert code == 0, text
    assert "/properties/v (oneOf of 2 different schemas)" in text and "JSON text" in text
    assert table is not None and table.schema.field("parsed").type.field("v").type == pa.string()
    assert all(json.loads(r["parsed"]["v"]) == json.loads(r["text"])["v"] for r in table.to_pylist())


@pytest.mark.parametrize("send", [True, False])
def test_rerun_sends_nothing_and_a_new_schema_redoes_the_rows(
        sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], send: bool) -> None:
    # without the schema the simulator answers prose: every row fails (once: no re-ask), and is kept
    output = "send_schema = true" if send else "send_schema = false\nparse_attempts = 0"
    keep = () if send else ("--no-retry-failed",)
    path = job(tmp_path, sim, QA, n=12, output=output)
    assert run(capsys, path)[0] == (0 if send else 1)
    sent = sim.stats["requests"]
    assert sent == 12
    run(capsys, path, *keep)
    assert sim.stats["requests"] == sent  # nothing sent again
    changed = {**QA, "properties": {**QA["properties"], "note": {"type": "string"}}}
    _, text, table = run(capsys, job(tmp_path, sim, changed, n=12, output=output), *keep)
    assert sim.stats["requests"] == sent + 12, text  # every row redone
    assert table is not None and table.num_rows == 12
    assert "note" in {f.name for f in table.schema.field("parsed").type}


def test_a_score_reads_a_parsed_field() -> None:
    from batch.scores import Scorer, ScoreSpec

    scorer = Scorer([ScoreSpec("answer", "exact_match", reference="gold", field="parsed.answer"),
                     ScoreSpec("year", "number", reference="year", field="parsed.source.year"),
                     ScoreSpec("whole", "json_valid")])
    row = {"gold": "Paris", "year": 1999, "parsed": {"answer": " paris ", "source": {"year": 1999}}}
    text = '{"answer": " paris ", "source": {"year": 1999}}'
    assert scorer.score(text, row) == {"score_answer": 1.0, "score_year": 1.0, "score_whole": 1.0}
    wrong = {**row, "parsed": {"answer": "Lyon", "source": None}}
    assert scorer.score(text, wrong) == {"score_answer": 0.0, "score_year": None, "score_whole": 1.0}
