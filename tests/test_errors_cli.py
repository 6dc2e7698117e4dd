"""Bad job files, inputs, outputs and API settings through the CLI.

Each case must end with exit code 2, one line on stderr naming the problem and
where it is (file, line, column, key), no traceback unless ``--debug``, and not
one request sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from tests.helpers import CliRun, prompts, run_cli, write_jsonl, write_parquet

MODEL = "simulator-small"


def one_line(run: CliRun) -> str:
    """The single error line of a failed run (no traceback, nothing else)."""
    assert "Traceback" not in run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert lines[0].startswith("promptmill: ")
    return lines[0]


def refused(capsys: pytest.CaptureFixture[str], sim: SimServer | None, *args: str | Path) -> str:
    """Run the CLI, expect exit 2 with one line and nothing sent; return the line."""
    run = run_cli(capsys, *args, "--no-progress")
    assert run.code == 2, run.err
    line = one_line(run)
    assert run.out == ""
    if sim is not None:
        assert sim.stats["requests"] == 0
    return line


def job_file(tmp_path: Path, sim: SimServer, inp: Path, body: str = "", *, api: str = "", inp_extra: str = "") -> Path:
    """A job file reading ``inp`` from the simulator; ``body`` is appended, ``api`` and
    ``inp_extra`` go into their sections. Line numbers: [input] is line 1."""
    text = (
        f'[input]\npath = "{inp}"\n{inp_extra}'
        f'[output]\npath = "{tmp_path / "out.parquet"}"\n'
        f'[api]\nbase_url = "{sim.base_url}"\n{api}'
        f'[request]\nmodel = "{MODEL}"\n'
        f"{body}"
    )
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def run_args(inp: Path, outp: Path, base_url: str, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--output", str(outp), "--base-url", base_url, "--model", MODEL, *extra]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", prompts(5))


# --- the job file ------------------------------------------------------------------


def test_missing_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, None, "run", tmp_path / "nope.toml")
    assert "nope.toml" in line and "job file not found" in line


def test_job_file_not_toml_names_the_line(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_file(tmp_path, sim, good, "temperature = = 0.2\n")
    line = refused(capsys, sim, "run", job)
    assert f"{job}, line 9" in line and "not valid TOML" in line


@pytest.mark.parametrize(
    ("extra", "key", "line_no", "what"),
    [
        ("[limits]\nconcurency = 4\n", "limits.concurency", 10, "unknown key"),
        ("[limits]\nconcurrency = \"4\"\n", "limits.concurrency", 10, "should be an integer, not a string"),
        ("[limits]\nconcurrency = 0\n", "limits.concurrency", 10, "should be an integer >= 1"),
        ("[limits]\nconcurrency = -3\n", "limits.concurrency", 10, "should be an integer >= 1"),
        ("[limits]\nrpm = 0\n", "limits.rpm", 10, "should be a number > 0"),
        ("[limits]\ntpm = -100\n", "limits.tpm", 10, "should be a number > 0"),
        ("[retry]\nmax_attempts = 0\n", "retry.max_attempts", 10, "should be an integer >= 1"),
    ],
)
def test_bad_job_file_key_names_line_and_key(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str],
    extra: str, key: str, line_no: int, what: str,
) -> None:
    job = job_file(tmp_path, sim, good, extra)
    line = refused(capsys, sim, "run", job)
    assert f"{job}, line {line_no}, key '{key}'" in line
    assert what in line


def test_unknown_endpoint_in_job_file(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_file(tmp_path, sim, good, api='endpoint = "rerank"\n')
    line = refused(capsys, sim, "run", job)
    assert f"{job}, line 7, key 'api.endpoint'" in line and "'chat', 'completions' or 'embeddings'" in line


def test_unknown_endpoint_option(tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse refuses it; its usage text goes first, then one line naming the option
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, *run_args(good, tmp_path / "o.parquet", "simulator", "--endpoint", "rerank"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--endpoint" in err and "invalid choice: 'rerank'" in err and "Traceback" not in err


def test_zero_concurrency_option_says_it_came_from_an_override(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(capsys, sim, *run_args(good, tmp_path / "o.parquet", sim.base_url, "--concurrency", "0"))
    assert "key 'limits.concurrency'" in line and "should be an integer >= 1" in line and "override" in line


def test_prompt_template_naming_a_missing_column(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_file(tmp_path, sim, good, inp_extra='prompt_template = "Summarise: {title}"\n')
    line = refused(capsys, sim, "run", job)
    assert f"{good}, line 1, column 'title'" in line and "{title}" in line


def test_job_file_holding_a_key_is_refused_without_echoing_it(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_file(tmp_path, sim, good, api='api_key = "sk-live-0123456789abcdef"\n')
    line = refused(capsys, sim, "run", job)
    assert f"{job}, line 7, key 'api.api_key'" in line
    assert "ATOMA_API_KEY" in line and "environment variable" in line
    assert "sk-live-0123456789abcdef" not in line


def test_job_file_holding_a_key_names_its_own_variable(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_file(tmp_path, sim, good, api='api_key_env = "VLLM_KEY"\ntoken = "abc123"\n')
    line = refused(capsys, sim, "run", job)
    assert "key 'api.token'" in line and "VLLM_KEY" in line and "abc123" not in line


# --- the input ----------------------------------------------------------------------


def bad_input(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], inp: Path, *extra: str) -> str:
    return refused(capsys, sim, *run_args(inp, tmp_path / "out" / "o.parquet", sim.base_url, *extra))


def test_missing_input(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    line = bad_input(tmp_path, sim, capsys, tmp_path / "missing.jsonl")
    assert "missing.jsonl: input file not found" in line


def test_input_that_is_not_parquet(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.parquet"
    inp.write_text("id,prompt\n1,hello\n")
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}: not a Parquet file, or truncated" in line


def test_truncated_parquet(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_parquet(tmp_path / "in.parquet", prompts(50))
    inp.write_bytes(inp.read_bytes()[:-100])
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}: not a Parquet file, or truncated" in line


@pytest.mark.parametrize("name", ["in.jsonl", "in.parquet"])
def test_empty_input(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], name: str) -> None:
    inp = tmp_path / name
    inp.write_bytes(b"")
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}: the input file is empty" in line


def test_parquet_with_no_rows(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), inp)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}: the input has no rows" in line


def jsonl_with(tmp_path: Path, bad: str, at: int = 4, n: int = 6) -> Path:
    """A JSONL input with ``bad`` as line ``at`` among good lines."""
    lines = [json.dumps(r) for r in prompts(n)]
    lines.insert(at - 1, bad)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ('{"id": "x", "prompt": "unclosed', "not valid JSON"),
        ("[1, 2, 3]", "not a JSON object but list"),
        ('"just a string"', "not a JSON object but str"),
    ],
)
def test_bad_jsonl_line_aborts_by_default(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], bad: str, what: str
) -> None:
    inp = jsonl_with(tmp_path, bad, at=4)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, line 4: {what}" in line


def test_bad_jsonl_lines_become_failed_rows_with_fail_row(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps(r) for r in prompts(6)]
    lines.insert(1, "{broken")
    lines.insert(4, "[1, 2]")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    outp = tmp_path / "o.parquet"
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{inp}"\non_bad_line = "fail_row"\n')
    run = run_cli(capsys, "run", job, *run_args(inp, outp, sim.base_url)[1:], "--no-progress")
    assert run.code == 1, run.err  # finished, with failed rows
    assert "Traceback" not in run.err
    rows = {r["id"]: r for r in pq.read_table(outp).to_pylist()}
    assert len(rows) == 8
    assert [rows[r["id"]]["status"] for r in prompts(6)] == ["ok"] * 6
    assert rows["<line 2>"]["status"] == "failed"
    assert rows["<line 2>"]["error"].startswith(f"{inp}, line 2: not valid JSON")
    assert rows["<line 5>"]["error"] == f"{inp}, line 5: not a JSON object but list"
    assert rows["<line 5>"]["error_code"] == "bad_input"
    assert sim.stats["requests"] == 6  # the bad lines were never sent
    assert "6 ok, 2 failed" in run.out


def test_bad_row_deep_in_the_input_stops_the_job_before_anything_is_sent(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = prompts(3000)
    rows[2500]["prompt"] = None
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, line 2501, column 'prompt': null prompt" in line


def test_no_prompt_column(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_parquet(tmp_path / "in.parquet", [{"id": "a", "text": "hello"}])
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, column 'prompt': no prompt column" in line and "the input has: id, text" in line


@pytest.mark.parametrize(("value", "what"), [(None, "null prompt"), (42, "must be a string, not int")])
def test_bad_prompt_value(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], value: object, what: str
) -> None:
    rows: list[dict[str, object]] = [*prompts(3)]
    rows[1]["prompt"] = value
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, line 2, column 'prompt'" in line and what in line


def test_null_prompt_in_parquet(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, object]] = [*prompts(4)]
    rows[2]["prompt"] = None
    inp = write_parquet(tmp_path / "in.parquet", rows)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, line 3, column 'prompt': null prompt" in line


@pytest.mark.parametrize(
    ("messages", "what"),
    [
        ("not a list", "messages must be a non-empty list"),
        ([], "messages must be a non-empty list"),
        ([{"content": "hi"}], "message 0 has no string 'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "user"}], "message 1 has no 'content'"),
    ],
)
def test_malformed_messages(
    tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str], messages: object, what: str
) -> None:
    good_messages = [{"role": "user", "content": "hello"}]
    rows = [{"id": "a", "messages": good_messages}, {"id": "b", "messages": messages}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.toml"
    job.write_text('[input]\nmessages_column = "messages"\n')
    line = refused(capsys, sim, "run", job, *run_args(inp, tmp_path / "o.parquet", sim.base_url)[1:])
    assert f"{inp}, line 2, column 'messages': {what}" in line


def test_duplicate_ids_name_the_first_few(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    rows = prompts(20)
    for i in range(10, 20):
        rows[i]["id"] = rows[i - 10]["id"]  # ten duplicates
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    line = bad_input(tmp_path, sim, capsys, inp)
    assert f"{inp}, line 11, column 'id': duplicate ids: 'p0000' (lines 1, 11)" in line
    assert "'p0004' (lines 5, 15) and 5 more" in line


# --- the output -----------------------------------------------------------------------


def test_output_folder_that_cannot_be_created(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = refused(capsys, sim, *run_args(good, blocker / "sub" / "o.parquet", sim.base_url))
    assert f"{blocker / 'sub'}: cannot create the output folder" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_output_folder_that_is_not_writable(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = refused(capsys, sim, *run_args(good, folder / "o.parquet", sim.base_url))
    finally:
        folder.chmod(0o755)
    assert f"{folder}: the output folder is not writable" in line


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a read-only /sys")
def test_output_on_a_read_only_file_system(sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /sys refuses new files even to root: the check happens before the first request
    line = refused(capsys, sim, *run_args(good, Path("/sys/kernel/o.parquet"), sim.base_url))
    assert "/sys/kernel: the output folder is not writable" in line


def test_output_path_that_is_a_folder(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results.parquet"
    folder.mkdir()
    line = refused(capsys, sim, *run_args(good, folder, sim.base_url))
    assert f"{folder}: the output path is a folder" in line


# --- the API ------------------------------------------------------------------------------


def test_no_api_key_for_a_remote_base_url(tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, None, *run_args(good, tmp_path / "o.parquet", "https://api.example.invalid/v1"))
    assert "no API key" in line and "ATOMA_API_KEY" in line and "api.example.invalid" in line


def test_no_api_key_names_the_jobs_variable(tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = run_args(good, tmp_path / "o.parquet", "https://api.example.invalid/v1", "--api-key-env", "MY_KEY")
    line = refused(capsys, None, *args)
    assert "set the environment variable MY_KEY" in line


def test_loopback_base_url_needs_no_key(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_cli(capsys, *run_args(good, tmp_path / "o.parquet", sim.base_url), "--no-progress")
    assert run.code == 0, run.err


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("api.example.com/v1", "is not an http(s) URL"),
        ("ftp://api.example.com/v1", "is not an http(s) URL"),
        ("https://", "is not an http(s) URL"),
        ("http://[::1/v1", "cannot be parsed as a URL"),
        ("https://api.example.com:99999/v1", "cannot be parsed as a URL"),
        ("https://api.exa mple.com/v1", "must not contain spaces"),
        ("https://user:pw@api.example.com/v1", "must not hold credentials"),
    ],
)
def test_unparseable_base_url(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], url: str, what: str
) -> None:
    line = refused(capsys, None, *run_args(good, tmp_path / "o.parquet", url))
    assert "key 'api.base_url'" in line and what in line
    assert "pw" not in line


def test_unparseable_base_url_in_job_file_names_the_line(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{good}"\n[output]\npath = "o.parquet"\n'
                   '[api]\nbase_url = "http//api.example.com"\n[request]\nmodel = "m"\n')
    line = refused(capsys, None, "run", job)
    assert f"{job}, line 6, key 'api.base_url'" in line


def test_key_over_plain_http_to_a_remote_host_is_refused(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATOMA_API_KEY", "sk-plain-http-0123456789")
    line = refused(capsys, None, *run_args(good, tmp_path / "o.parquet", "http://api.example.invalid/v1"))
    assert "plain http" in line and "api.example.invalid" in line and "--allow-insecure-http" in line
    assert "sk-plain-http" not in line


# --- --debug --------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    inp = jsonl_with(tmp_path, "{broken", at=2)
    run = run_cli(capsys, *run_args(inp, tmp_path / "o.parquet", sim.base_url), "--no-progress", "--debug")
    assert run.code == 2
    assert "Traceback" in run.err and "InputError" in run.err
    assert f"{inp}, line 2: not valid JSON" in run.err
    assert sim.stats["requests"] == 0


def test_a_base_url_without_its_version_fails_every_row_and_says_what_to_check_once(
    tmp_path: Path, sim: SimServer, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the simulator serves /v1/...: without /v1 every request gets a 404
    run = run_cli(capsys, *run_args(good, tmp_path / "o.parquet", sim.base_url.removesuffix("/v1"), "--no-progress"))
    assert run.code == 1
    told = [line for line in run.err.splitlines() if "failed:" in line]
    assert len(told) == 1, run.err  # one line, not one per row
    assert "HTTP 404 (not_found): no route /chat/completions; check api.base_url (with its version prefix" in told[0]
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert len(rows) == 5 and {r["http_status"] for r in rows} == {404}
