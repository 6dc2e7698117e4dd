"""The contract for schedulers: exit codes, --summary-json, --log-format json, --date and {ds}."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.errors import EXIT_REASONS
from batch.simulator import SimServer
from tests.helpers import prompts, run_cli, write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def write_job(tmp_path: Path, sim: SimServer, inp: Path, output: str) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f"""\
[job]
name = "nightly"

[input]
path = "{inp}"

[output]
path = "{output}"

[api]
base_url = "{sim.base_url}"

[request]
model = "simulator-small"
max_tokens = 16

[retry]
max_attempts = 2
initial_wait_s = 0.01
""")
    return job


def test_every_exit_code_is_pinned_and_in_the_readme() -> None:
    # each code is also run end to end: 0, 1, 2 here; 3 in test_limits_e2e (fatal answers, outage);
    # 75 in test_resume (the output locked by another run); 130 and 143 in test_resume (signals);
    # 65 and 74 by the input-change and disk-error tests; 4 in test_budget (the budget reached).
    assert sorted(EXIT_REASONS) == [0, 1, 2, 3, 4, 65, 74, 75, 130, 143]
    assert "EX_TEMPFAIL" in EXIT_REASONS[75] and "lock" in EXIT_REASONS[75]
    assert "EX_IOERR" in EXIT_REASONS[74]
    assert "input changed" in EXIT_REASONS[65]
    table = README.read_text().split("## Scheduling", 1)[1]
    for code in EXIT_REASONS:
        assert re.search(rf"^\| {code} \|", table, re.MULTILINE), f"exit code {code} is not in the README's table"


def test_summary_json_dash_is_the_last_stdout_line_and_alone(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    job = write_job(tmp_path, sim, inp, str(tmp_path / "res.parquet"))
    run = run_cli(capsys, "run", job, "--no-progress", "--summary-json", "-")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert len(lines) == 1  # nothing else on stdout: the text summary went to stderr
    doc = json.loads(lines[-1])
    assert doc["exit_code"] == 0 and doc["rows_ok"] == 20 and doc["rows_total"] == 20
    assert doc["totals"]["prompt_tokens"] > 0 and doc["totals"]["cost_usd"] is not None
    assert doc["output"] == str(tmp_path / "res.parquet")
    assert json.loads(Path(doc["summary_path"]).read_text())["rows_ok"] == 20
    assert "rows      20 ok" in run.err
    assert len(run.out) < 2000  # small: never rows


def test_failed_rows_exit_1_unless_within_max_failed_fraction(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.configure(context_tokens=40)
    rows = prompts(18) + [{"id": f"long{i}", "prompt": "word " * 200} for i in range(2)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(tmp_path, sim, inp, str(tmp_path / "res.parquet"))
    summary = tmp_path / "sched" / "summary.json"

    run = run_cli(capsys, "run", job, "--no-progress", "--summary-json", summary)
    assert run.code == 1, run.err
    doc = json.loads(summary.read_text())
    assert (doc["exit_code"], doc["rows_ok"], doc["rows_failed"]) == (1, 18, 2)
    assert doc["failed_fraction"] == 0.1

    # the rerun retries the two failed rows (they fail again); 10 % failed is allowed here
    run = run_cli(capsys, "run", job, "--no-progress", "--max-failed-fraction", "0.1")
    assert run.code == 0, run.err
    run = run_cli(capsys, "run", job, "--no-progress", "--max-failed-fraction", "0.05")
    assert run.code == 1, run.err

    with pytest.raises(SystemExit) as bad:
        run_cli(capsys, "run", job, "--max-failed-fraction", "1.5")
    assert bad.value.code == 2 and "'1.5' is not a fraction between 0 and 1" in capsys.readouterr().err


def test_bad_input_exits_2_and_the_summary_json_says_why(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, sim, tmp_path / "missing.jsonl", str(tmp_path / "res.parquet"))
    run = run_cli(capsys, "run", job, "--summary-json", "-")
    assert run.code == 2
    doc = json.loads(run.out.splitlines()[-1])
    assert doc == {
        "job": "nightly", "exit_code": 2, "exit_reason": EXIT_REASONS[2],
        "error": f"{tmp_path / 'missing.jsonl'}: input file not found",
    }
    assert sim.stats["requests"] == 0


def test_log_format_json_every_line_parses_and_names_the_job(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATOMA_API_KEY", 'sk-secret-"quoted"-key-123')
    sim.configure(context_tokens=40)  # a failed row: its warning line is an event too
    rows = [*prompts(5), {"id": "long", "prompt": "word " * 200}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(tmp_path, sim, inp, str(tmp_path / "res.parquet"))
    run = run_cli(capsys, "run", job, "--log-format", "json", "--summary-json", "-")
    assert run.code == 1
    events = [json.loads(line) for line in run.err.splitlines()]
    assert events and all({"time", "level", "event", "logger", "job"} <= e.keys() for e in events)
    assert all(e["job"] == "nightly" for e in events)
    assert any(e["level"] == "warning" and "row long failed" in e["event"] for e in events)
    assert any("rows      5 ok, 1 failed" in e["event"] for e in events)
    assert "sk-secret" not in run.err + run.out
    assert json.loads(run.out.splitlines()[-1])["exit_code"] == 1


def test_the_same_date_resumes_into_the_same_output(
    sim: SimServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    job = write_job(tmp_path, sim, inp, str(tmp_path / "{job}-{ds}.parquet"))
    run = run_cli(capsys, "run", job, "--no-progress", "--date", "2024-06-30")
    assert run.code == 0, run.err
    out = tmp_path / "nightly-2024-06-30.parquet"
    assert pq.read_table(out).num_rows == 12
    sim.reset_stats()

    # a cleared task run again for the same logical date: nothing is sent twice
    again = run_cli(capsys, "run", job, "--no-progress", "--date", "2024-06-30", "--summary-json", "-")
    assert again.code == 0, again.err
    doc = json.loads(again.out.splitlines()[-1])
    assert (doc["rows_skipped"], doc["rows_ok"], doc["output"]) == (12, 0, str(out))
    assert sim.stats["requests"] == 0

    with pytest.raises(SystemExit) as bad:
        run_cli(capsys, "run", job, "--date", "30/06/2024")
    assert bad.value.code == 2
    assert "'30/06/2024' is not a date like 2024-06-30 (YYYY-MM-DD)" in capsys.readouterr().err
