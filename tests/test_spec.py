"""The job spec: what a good job file gives, and one clear line for every bad one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batch.errors import JobFileError
from batch.simulator import table_problem
from batch.spec import JobSpec
from batch.spec_load import load_job
from tests.helpers import MINIMAL_JOB

GOOD = """\
[job]
name = "reviews"

[input]
path = "reviews.parquet"
prompt_template = "Summarise: {title}"
system_prompt = "Be terse."
passthrough = ["lang"]

[output]
path = "out/{job}-{date}.parquet"

[api]
base_url = "https://api.atoma.network/v1/"
endpoint = "chat"
stream = true

[request]
model = "llama"
max_tokens = 64
temperature = 0.2
stop = ["\\n\\n"]
seed = 7
response_format = { type = "json_object" }

[limits]
concurrency = 8
rpm = 600

[retry]
max_attempts = 3

[pricing."llama"]
input = 0.5
output = 1.5

[pricing."other"]
input = 1
output = 2
cached_input = 0.25
"""

MINIMAL = MINIMAL_JOB

REQUIRED = {
    "input.path": "in.jsonl",
    "output.path": "out.parquet",
    "api.base_url": "simulator",
    "request.model": "m",
}


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: dict[str, Any] | None = None) -> JobFileError:
    """The error loading the job as the CLI does (its [simulator] table checked by the simulator)."""
    with pytest.raises(JobFileError) as info:
        load_job(path, overrides, check_simulator=table_problem)
    return info.value


def test_good_job_file(tmp_path: Path) -> None:
    spec = load_job(write(tmp_path, GOOD))
    assert isinstance(spec, JobSpec)
    assert spec.name == "reviews"
    assert spec.source == tmp_path / "job.toml"
    assert spec.input.path == Path("reviews.parquet")
    assert spec.input.template_columns == ("title",)
    assert spec.input.passthrough == ("lang",)
    assert spec.api.base_url == "https://api.atoma.network/v1"
    assert spec.api.stream is True
    assert spec.api.api_key_env == "ATOMA_API_KEY"
    assert spec.request.extra == {"response_format": {"type": "json_object"}}
    assert spec.request.params() == {
        "max_tokens": 64,
        "temperature": 0.2,
        "stop": ["\n\n"],
        "seed": 7,
        "response_format": {"type": "json_object"},
    }
    assert spec.limits.concurrency == 8
    assert spec.limits.rpm == 600
    assert spec.limits.tpm is None
    assert spec.retry.max_attempts == 3
    llama = spec.pricing["llama"]
    assert (llama.input, llama.output, llama.cached_input) == (0.5, 1.5, 0.5)
    other = spec.pricing["other"]
    assert (other.input, other.output, other.cached_input) == (1.0, 2.0, 0.25)
    assert spec.output_path(datetime(2025, 3, 4, 23, 30, tzinfo=UTC)) == Path("out/reviews-2025-03-04.parquet")


def test_defaults(tmp_path: Path) -> None:
    spec = load_job(write(tmp_path, MINIMAL, "nightly.toml"))
    assert spec.name == "nightly"
    assert spec.input.format == "auto"
    assert (spec.input.id_column, spec.input.id_name) == (None, "id")
    assert spec.input.prompt_column == "prompt"
    assert spec.input.on_bad_line == "abort"
    assert spec.api.endpoint == "chat"
    assert spec.api.stream is False
    assert spec.request.max_tokens == 256
    assert spec.request.params() == {"max_tokens": 256}
    assert spec.limits.concurrency == 32
    assert spec.retry.max_attempts == 5
    assert spec.pricing == {}
    assert spec.simulator is None


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    spec = load_job(
        write(tmp_path, GOOD),
        {"limits.concurrency": 2, "api.stream": False, "request.model": "other", "limits.tpm": None},
    )
    assert spec.limits.concurrency == 2
    assert spec.api.stream is False
    assert spec.request.model == "other"
    assert spec.limits.rpm == 600


def test_no_job_file_everything_from_overrides() -> None:
    spec = load_job(None, REQUIRED)
    assert spec.name == "job"
    assert spec.source is None
    assert spec.api.is_simulator


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_no_job_file_and_a_required_key_missing(missing: str) -> None:
    err = error_of(None, {k: v for k, v in REQUIRED.items() if k != missing})
    assert err.key == missing
    assert f"key '{missing}'" in str(err)
    assert "missing" in str(err)


def test_missing_job_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "nope.toml")
    assert str(err) == f"{tmp_path / 'nope.toml'}: job file not found"


def test_not_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[input]\npath = \"a\"\nthis is not toml\n")
    err = error_of(path)
    assert err.line == 3
    assert str(err).startswith(f"{path}, line 3: not valid TOML")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b"[input]\npath = \"\xff\"\n")
    err = error_of(path)
    assert (err.path, err.line) == (path, 2)


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        (MINIMAL + "\n[limits]\nconcurency = 4\n", 14, "limits.concurency", "unknown key"),
        (MINIMAL + "\n[limit]\nconcurrency = 4\n", 13, "limit", "unknown key"),
        (MINIMAL.replace('model = "m"', 'model = "m"\nstream = true'), 12, "request.stream", "set by promptmill"),
        (MINIMAL + "\n[limits]\nconcurrency = \"8\"\n", 14, "limits.concurrency", "should be an integer, not"),
        (MINIMAL + "\n[limits]\nconcurrency = true\n", 14, "limits.concurrency", "should be an integer, not"),
        (MINIMAL + "\n[limits]\nconcurrency = 0\n", 14, "limits.concurrency", "should be an integer >= 1"),
        (MINIMAL + "\n[limits]\nconcurrency = -3\n", 14, "limits.concurrency", "should be an integer >= 1"),
        (MINIMAL + "\n[limits]\nrpm = 0\n", 14, "limits.rpm", "should be a number > 0"),
        (MINIMAL + "\n[limits]\ntpm = -1.5\n", 14, "limits.tpm", "should be a number > 0"),
        (MINIMAL + "\n[retry]\nmax_attempts = 0\n", 14, "retry.max_attempts", "should be an integer >= 1"),
        (MINIMAL.replace('model = "m"', 'model = "m"\nmax_tokens = 0'), 12, "request.max_tokens", "should be an integer >= 1"),
        (MINIMAL.replace('/v1"', '/v1"\nendpoint = "rerank"'), 9, "api.endpoint", "'chat', 'completions' or 'embeddings'"),
        (MINIMAL.replace('/v1"', '/v1"\nstream = "yes"'), 9, "api.stream", "should be true or false, not a string"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nformat = "csv"'), 3, "input.format", "'auto'"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\non_bad_line = "skip"'), 3, "input.on_bad_line", "'abort'"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\npassthrough = "lang"'), 3, "input.passthrough", "should be a list, not a string"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nprompt_template = "{}"'), 3, "input.prompt_template", "positional"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nprompt_template = "{a.b}"'), 3, "input.prompt_template", "plain column"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nprompt_template = "{oops"'), 3, "input.prompt_template", ""),
        (
            MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nmessages_column = "m"\nprompt_template = "{a}"'),
            4,
            "input.prompt_template",
            "exclude each other",
        ),
        (MINIMAL.replace('"out.parquet"', '"out-{day}.parquet"'), 5, "output.path", "unknown placeholder {day}"),
        (MINIMAL.replace("http://127.0.0.1:8089/v1", "ftp://x/v1"), 8, "api.base_url", "http(s) URL"),
        (MINIMAL + '\n[pricing."m"]\ninput = "cheap"\noutput = 1\n', 14, "pricing.m.input", "should be a number, not a string"),
        (MINIMAL + '\n[pricing."m"]\ninput = 1\n', 13, "pricing.m.output", "missing"),
        (MINIMAL + '\n[pricing."m"]\ninput = -1\noutput = 1\n', 14, "pricing.m.input", "should be a number >= 0"),
        (MINIMAL + "\n[job]\nname = 3\n", 14, "job.name", "should be a string, not an integer"),
        ('source = "x"\n' + MINIMAL, 1, "source", "unknown key"),
        (MINIMAL + '\n[pricing]\nm = 3\n', 14, "pricing.m", "should be a table, not an integer"),
        (MINIMAL + "\n[limits]\nconcurrency = 99999999999999999999\n", 14, "limits.concurrency",
         "should be an integer <= 9223372036854775807"),
        (MINIMAL.replace('model = "m"', 'model = "m"\nlogit_bias = { 7 = 99999999999999999999 }'), 12,
         "request.logit_bias", "cannot be sent as JSON"),
        (MINIMAL.replace('path = "in.jsonl"', "path = 3"), 2, "input.path", "should be a path, not an integer"),
        (MINIMAL + "\n[limits]\nconcurrency = 1.5\n", 14, "limits.concurrency", "should be an integer, not a number"),
        (MINIMAL.replace('model = "m"', 'model = "m"\ntemperature = inf'), 12, "request.temperature", "finite number"),
        (MINIMAL.replace('model = "m"', 'model = "m"\nfrequency_penalty = -inf'), 12, "request.frequency_penalty",
         "finite number"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\npassthrough = ["a", "a"]'), 3, "input.passthrough",
         "'a' is listed twice"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\npassthrough = ["model"]'), 3, "input.passthrough",
         "'model' is a column promptmill writes itself"),
        (MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\npassthrough = ["id"]'), 3, "input.passthrough",
         "written as 'id' anyway"),
        (MINIMAL.replace('"out.parquet"', '"out.jsonl"'), 5, "output.path", "ending in .parquet"),
        (MINIMAL + "\n[simulator]\nbogus = 1\n", 14, "simulator.bogus", "unknown simulator setting"),
        (MINIMAL + '\n[simulator]\nlatency_ms = "fast"\n', 14, "simulator.latency_ms", "wrong type"),
        (MINIMAL + "\n[simulator]\nfault_rate = 2\n", 14, "simulator.fault_rate", "between 0 and 1"),
        (MINIMAL + "\n[simulator]\nfault_rate = 0.5\nfaults = []\n", 13, "simulator", "faults is empty"),
    ],
)
def test_bad_job_file_names_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.path, err.line, err.key) == (path, line, key)
    assert str(err).startswith(f"{path}, line {line}, key '{key}': ")
    assert words in str(err)


def test_completions_endpoint_refuses_a_messages_column(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nmessages_column = "messages"')
    text = text.replace('/v1"', '/v1"\nendpoint = "completions"')
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.line, err.key) == (3, "input.messages_column")
    assert "completions" in str(err)


def test_plain_http_to_a_remote_host_when_allowed(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8089/v1", "http://gpu-box:8000/v1")
    text = text.replace("[api]\n", "[api]\nallow_insecure_http = true\n")
    assert load_job(write(tmp_path, text)).api.base_url == "http://gpu-box:8000/v1"


@pytest.mark.parametrize(
    ("section", "line_text", "key"),
    [
        ("api", 'api_key = "sk-live-123456"', "api.api_key"),
        ("api", 'token = "sk-live-123456"', "api.token"),
        ("request", 'authorization = "Bearer sk-live-123456"', "request.authorization"),
        ("request", 'openai_api_key = "sk-live-123456"', "request.openai_api_key"),
        ("input", 'key = "sk-live-123456"', "input.key"),
        ("api", 'extra_header = "Bearer sk-live-123456"', "api.extra_header"),
    ],
)
def test_a_key_in_the_job_file_is_refused_without_echoing_it(
    tmp_path: Path, section: str, line_text: str, key: str
) -> None:
    text = MINIMAL.replace(f"[{section}]\n", f"[{section}]\n{line_text}\n")
    path = write(tmp_path, text)
    err = error_of(path)
    assert err.key == key
    assert err.path == path
    assert err.line is not None
    assert "environment variable named by api.api_key_env (ATOMA_API_KEY)" in str(err)
    assert "sk-live" not in str(err)


def test_the_refusal_names_the_configured_variable(tmp_path: Path) -> None:
    text = MINIMAL.replace("[api]\n", '[api]\napi_key_env = "OPENAI_API_KEY"\napi_key = "sk-live-1"\n')
    err = error_of(write(tmp_path, text))
    assert "(OPENAI_API_KEY)" in str(err)
    assert "sk-live" not in str(err)


def test_a_key_pasted_as_api_key_env_is_not_echoed(tmp_path: Path) -> None:
    text = MINIMAL.replace("[api]\n", '[api]\napi_key_env = "sk-live-abcdef"\n')
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.line, err.key) == (8, "api.api_key_env")
    assert "name of an environment variable" in str(err)
    assert "sk-live" not in str(err)


def test_credentials_in_the_base_url_are_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8089/v1", "https://user:sk-live-9@api.example.com/v1")
    err = error_of(write(tmp_path, text))
    assert err.key == "api.base_url"
    assert "sk-live" not in str(err)


def test_a_key_in_overrides_is_refused() -> None:
    err = error_of(None, {**REQUIRED, "api.api_key": "sk-live-1"})
    assert err.key == "api.api_key"
    assert "sk-live" not in str(err)


def test_a_bad_override_is_named_as_an_override(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, MINIMAL), {"limits.concurrency": 0})
    assert err.key == "limits.concurrency"
    assert err.line is None
    assert "set by an override" in str(err)


def test_unknown_override_key() -> None:
    err = error_of(None, {**REQUIRED, "limits.concurency": 4})
    assert err.key == "limits.concurency"
    assert "unknown key" in str(err)


def test_request_extra_fields_pass_through_in_order(tmp_path: Path) -> None:
    text = MINIMAL.replace('model = "m"', 'model = "m"\nlogprobs = true\ntop_p = 0.9\nn = 2')
    spec = load_job(write(tmp_path, text), {"request.presence_penalty": 0.5})
    assert list(spec.request.params()) == ["max_tokens", "top_p", "n", "logprobs", "presence_penalty"]


def test_simulator_table_is_kept(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8089/v1", "simulator") + "\n[simulator]\nlatency_ms = 5\n"
    spec = load_job(write(tmp_path, text))
    assert spec.simulator == {"latency_ms": 5}




# --- an error about a bad value quotes the value (never one that may be a key) ----------------


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("http://127.0.0.1:8089/v1", "ht!tp:/nowhere",
         "line 8, key 'api.base_url': 'ht!tp:/nowhere' is not an http(s) URL like https://api.atoma.network/v1, "
         'nor "simulator"'),
        ("http://127.0.0.1:8089/v1", "https://api.example.com:99999/v1",
         "line 8, key 'api.base_url': 'https://api.example.com:99999/v1' cannot be parsed as a URL: "
         "Port out of range 0-65535"),
        ("http://127.0.0.1:8089/v1", "https://api.example.com/v1\\t",
         "line 8, key 'api.base_url': 'https://api.example.com/v1\\t' must not contain spaces or control characters"),
        ('path = "out.parquet"', 'path = "out/results.csv"',
         "line 5, key 'output.path': 'out/results.csv' ends in .csv: the output is a Parquet file; "
         "give a path ending in .parquet"),
        ('model = "m"', 'model = "m"\nfrequency_penalty = nan',
         "line 12, key 'request.frequency_penalty': nan is not a finite number (JSON has no inf or nan)"),
        ('[api]\n', '[api]\nendpoint = "rerank"\n',
         "line 8, key 'api.endpoint': 'rerank' should be 'chat', 'completions' or 'embeddings'"),
        ('[api]\n', '[api]\nstream = "yes"\n', "line 8, key 'api.stream': 'yes' should be true or false, not a string"),
        ('model = "m"', 'model = "m"\nmax_tokens = 0', "line 12, key 'request.max_tokens': 0 should be an integer >= 1"),
    ],
)
def test_an_error_about_a_bad_value_quotes_it(tmp_path: Path, replace: str, by: str, message: str) -> None:
    path = write(tmp_path, MINIMAL.replace(replace, by))
    assert str(error_of(path)) == f"{path}, {message}"


def test_a_bad_override_quotes_its_value() -> None:
    err = error_of(None, {**REQUIRED, "limits.concurrency": "4"})
    assert str(err) == "key 'limits.concurrency': '4' should be an integer, not a string (set by an override)"


def test_a_bad_simulator_setting_quotes_its_value(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, MINIMAL + '\n[simulator]\nlatency_ms = "fast"\n'))
    assert str(err).endswith("key 'simulator.latency_ms': simulator setting 'latency_ms' has the wrong type (str): 'fast'")


@pytest.mark.parametrize("value", ["sk-proj-Abc123def456ghi789jkl012", "0123456789abcdef0123456789abcdef",
                                   "https://x/sk-live-from-env-42"])
def test_a_bad_value_that_may_be_a_key_is_not_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-from-env-42")
    text = MINIMAL.replace("http://127.0.0.1:8089/v1", value.replace("https://", "htps://"))
    err = error_of(write(tmp_path, text))
    assert err.key == "api.base_url"
    assert "the value (not quoted: it may be a key) is not an http(s) URL" in str(err)
    assert "sk-" not in str(err) and "0123" not in str(err)


@pytest.mark.parametrize("uri", ["s3://bucket/prompts.parquet", "gs://b/p.jsonl", "file:///data/in.jsonl"])
def test_an_input_given_as_a_uri_is_refused_with_what_to_do_instead(tmp_path: Path, uri: str) -> None:
    path = write(tmp_path, MINIMAL.replace('path = "in.jsonl"', f'path = "{uri}"'))
    err = error_of(path)
    scheme = uri.split(":")[0]
    assert str(err) == (f"{path}, line 2, key 'input.path': is a URI ({scheme}://): promptmill reads the input "
                        "as a file; mount the store (s3fs, gcsfuse, a shared volume) and give the mounted path")
