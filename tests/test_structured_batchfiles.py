"""A schema beside embeddings and OpenAI batch files: the combinations that make no sense are
refused at load, in one line naming the key, before anything is sent or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import prompts, run_cli, write_jsonl

SAMPLE = Path(__file__).parent.parent / "sample_data" / "batch_requests.jsonl"


@pytest.mark.parametrize(("case", "said"), [
    ("embeddings", "the embeddings endpoint answers vectors"),
    ("batch_input", "with an OpenAI batch file (input)"),
    ("batch_output", "with an OpenAI batch file (output)"),
])
def test_a_schema_that_cannot_apply_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, said: str
) -> None:
    inp = SAMPLE if case == "batch_input" else write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / ("res.jsonl" if case == "batch_output" else "res.parquet")
    fmt = 'format = "openai_batch"\n' if case == "batch_output" else ""
    endpoint = 'endpoint = "embeddings"\n' if case == "embeddings" else ""
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\n[output]\npath = "{out}"\n{fmt}'
                   '[output.schema]\ntype = "object"\n'
                   f'[api]\nbase_url = "simulator"\n{endpoint}[request]\nmodel = "m"\n')
    result = run_cli(capsys, "run", str(job), "--no-progress")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err
    assert said in lines[0] and "key 'output.schema'" in lines[0] and "job.toml" in lines[0]
    assert not out.exists()
