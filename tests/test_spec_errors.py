"""Job-file errors: the exact line a user reads (file, line, key, message), and the pieces
that find it: msgspec's documented path suffix, a key's line in the TOML syntax tree."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from batch.errors import JobFileError
from batch.spec_errors import describe, dotted, key_lines, split_path, toml_syntax_error
from batch.spec_load import load_job
from tests.helpers import MINIMAL_JOB

MINIMAL = MINIMAL_JOB


def error_line(tmp_path: Path, text: str, overrides: dict[str, Any] | None = None) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JobFileError) as info:
        load_job(path, overrides)
    return str(info.value).removeprefix(f"{path}, ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(MINIMAL + "\n[limits]\nrpm = 1\n\"max rpm\" = 2\n",
                     "line 15, key 'limits.max rpm': unknown key", id="unknown key in a nested table"),
        pytest.param(MINIMAL + "\n[limits]\nconcurrency = \"\"\"\n8\"\"\"\n",
                     "line 14, key 'limits.concurrency': '8' should be an integer, not a string",
                     id="wrong type"),
        pytest.param(MINIMAL + "\n[limits]\nrpm = true\n",
                     "line 14, key 'limits.rpm': true should be a number, not a boolean", id="boolean"),
        pytest.param(MINIMAL + "\n[limits]\nconcurrency = 2024-01-01\n",
                     "line 14, key 'limits.concurrency': 2024-01-01 should be an integer, not a date",
                     id="date"),
        pytest.param(MINIMAL.replace('model = "m"', 'model = "m"\ntop_p = 2'),
                     "line 12, key 'request.top_p': 2 should be a number <= 1", id="out of range"),
        pytest.param(MINIMAL + "\n[retry]\nmax_attempts = 0\n",
                     "line 14, key 'retry.max_attempts': 0 should be an integer >= 1", id="integer > 0"),
        pytest.param(MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\nformat = "csv"'),
                     "line 3, key 'input.format': 'csv' should be 'auto', 'parquet', 'jsonl' or 'openai_batch'",
                     id="bad Literal value"),
        pytest.param(MINIMAL.replace('/v1"', '/v1"\nendpoint = 3'),
                     "line 9, key 'api.endpoint': 3 should be 'chat', 'completions' or 'embeddings'",
                     id="Literal given another type"),
        pytest.param(MINIMAL + "\n[[input.passthrough]]\nname = \"lang\"\n",
                     "line 13, key 'input.passthrough[0]': {'name': 'lang'} should be a string, not a table",
                     id="array-of-tables element"),
        pytest.param(MINIMAL + "\n[[limits]]\nrpm = 1\n",
                     "line 13, key 'limits': [{'rpm': 1}] should be a table, not a list",
                     id="array of tables for a table"),
        pytest.param(MINIMAL.replace('path = "in.jsonl"', 'path = "in.jsonl"\npassthrough = [\n  "a",\n  2,\n]'),
                     "line 5, key 'input.passthrough[1]': 2 should be a string, not an integer",
                     id="array element on its own line"),
        pytest.param(MINIMAL.replace('model = "m"', 'model = "m"\nstop = ["a", 1]'),
                     "line 12, key 'request.stop[1]': 1 should be a string, not an integer",
                     id="element of a union's list"),
        pytest.param("limits.concurrency = 0\n" + MINIMAL,
                     "line 1, key 'limits.concurrency': 0 should be an integer >= 1", id="dotted key"),
        pytest.param("limits.bogus = 0\n" + MINIMAL,
                     "line 1, key 'limits.bogus': unknown key", id="unknown dotted key"),
        pytest.param("retry = { max_attempts = 2, max_wait_s = -1 }\n" + MINIMAL,
                     "line 1, key 'retry.max_wait_s': -1 should be a number >= 0", id="inline table"),
        pytest.param("retry = { max_attempts = 2, nope = { a = 1 } }\n" + MINIMAL,
                     "line 1, key 'retry.nope': unknown key", id="unknown key in an inline table"),
        pytest.param(MINIMAL + '\n[pricing."org/model.v2"]\ninput = 1\noutput = 1\nbogus = 2\n',
                     "line 16, key 'pricing.org/model.v2.bogus': unknown key", id="quoted table name"),
        pytest.param(MINIMAL + '\n[pricing."org/model.v2"]\ninput = 1\n',
                     "line 13, key 'pricing.org/model.v2.output': required key is missing", id="missing key"),
        pytest.param(MINIMAL.replace('path = "in.jsonl"', "path = 3"),
                     "line 2, key 'input.path': 3 should be a path, not an integer", id="path"),
        pytest.param('[input]\npath = "a"\nprompt = """\nx = \n', "line 5: not valid TOML: "
                     "Unterminated string (at the end of the file)", id="TOML syntax error at the end"),
        pytest.param('[input]\npath = "a"\n\n  path = "b"\n',
                     "line 4: not valid TOML: Cannot overwrite a value (column 13)", id="TOML syntax error"),
    ],
)
def test_a_bad_job_file_says_line_key_and_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    assert error_line(tmp_path, text) == message


def test_a_key_set_by_an_override_has_no_line(tmp_path: Path) -> None:
    assert error_line(tmp_path, MINIMAL, {"retry.max_wait_s": -2}) == (
        "key 'retry.max_wait_s': -2 should be a number >= 0 (set by an override)")


def test_a_good_job_does_not_import_the_toml_syntax_tree(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(MINIMAL, encoding="utf-8")
    code = ("import sys; from batch.spec_load import load_job; load_job(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith(('tree_sitter', 'tomlkit'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.toml")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("message", "split"),
    [
        ("Expected `int` >= 1 - at `$.limits.concurrency`", ("Expected `int` >= 1", ("limits", "concurrency"))),
        ("Expected `str`, got `int` - at `$.a.b[12].c`", ("Expected `str`, got `int`", ("a", "b", 12, "c"))),
        ("Expected `int`, got `str` - at `$[...]`", ("Expected `int`, got `str`", ())),
        ("Expected `int`, got `str` - at `$.extra[...].x`", ("Expected `int`, got `str`", ("extra",))),
        ("Object missing required field `a`", ("Object missing required field `a`", ())),
    ],
)
def test_split_path_reads_msgspecs_documented_suffix(message: str, split: tuple[str, tuple[Any, ...]]) -> None:
    assert split_path(message) == split


class _Inner(msgspec.Struct, forbid_unknown_fields=True):
    n: int = 1


class _Outer(msgspec.Struct, forbid_unknown_fields=True):
    items: list[_Inner] = []


def test_describe_follows_msgspecs_real_path() -> None:
    """Against the installed msgspec: its path still leads to the bad value."""
    data = {"items": [{"n": 1}, {"n": "2"}]}
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, _Outer, strict=True)
    assert describe(info.value, _Outer, data) == ("'2' should be an integer, not a string", ("items", 1, "n"))
    data = {"items": [{"n": 1, "m": 2}]}
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, _Outer, strict=True)
    assert describe(info.value, _Outer, data) == ("unknown key", ("items", 0, "m"))


def test_key_lines_from_the_syntax_tree() -> None:
    text = """\
top = 1
a.b."c.d" = 2          # a dotted key
s = '''
fake = 1
'''
t = { u = 1, v = { w = [1,  # a comment
  { x = 2 }] } }  # another

[[arr]]
q = 1

[[arr]]
q = 2
[arr.sub]
r = 3
[[arr.list]]
z = 4
"""
    assert tomllib.loads(text)  # valid TOML
    lines = key_lines(text)
    assert lines[("top",)] == 1
    assert lines[("a",)] == lines[("a", "b")] == lines[("a", "b", "c.d")] == 2
    assert lines[("s",)] == 3
    assert ("fake",) not in lines  # inside a multi-line string
    assert lines[("t", "v", "w", 1, "x")] == 7
    assert lines[("arr",)] == lines[("arr", 0)] == 9
    assert lines[("arr", 0, "q")] == 10
    assert lines[("arr", 1)] == 12
    assert lines[("arr", 1, "q")] == 13
    assert lines[("arr", 1, "sub", "r")] == 15
    assert lines[("arr", 1, "list", 0, "z")] == 17


def test_key_lines_with_comments_escapes_and_crlf() -> None:
    text = 'x = [1, {a=1}] # c\r\n[t] # hi\r\n"q\\u0041" = { b = 2 } # c\r\n'
    assert tomllib.loads(text) == {"x": [1, {"a": 1}], "t": {"qA": {"b": 2}}}
    assert key_lines(text) == {("x",): 1, ("x", 0): 1, ("x", 1): 1, ("x", 1, "a"): 1,
                               ("t",): 2, ("t", "qA"): 3, ("t", "qA", "b"): 3}


def test_toml_syntax_error_position() -> None:
    for text, said in [("a = 1\nb = \n", ("Invalid value (column 5)", 2)),
                       ("a = [", ("Invalid value (at the end of the file)", 1))]:
        with pytest.raises(tomllib.TOMLDecodeError) as info:
            tomllib.loads(text)
        assert toml_syntax_error(info.value, text) == said


def test_dotted() -> None:
    assert dotted(("input", "passthrough", 0, "x")) == "input.passthrough[0].x"
    assert dotted(()) == ""
