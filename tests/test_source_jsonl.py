"""The JSONL source: rows line by line, and one clear line for every bad line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from batch.errors import InputError
from batch.records import Row
from batch.sources import open_source
from tests.source_helpers import all_rows, input_error, spec, write_jsonl


def test_without_an_id_column_the_row_index_is_the_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with path.open("ab") as f:
        f.write(b"\n   \n" + orjson.dumps({"prompt": "c"}) + b"\n")
    source = open_source(spec(path))
    source.check_ids()
    rows = all_rows(source)
    assert [(r.index, r.line, r.id, r.prompt) for r in rows] == [(0, 1, "0", "a"), (1, 2, "1", "b"), (2, 5, "2", "c")]


def test_jsonl_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": 1, "title": "T1", "lang": "en"}, {"id": "x", "title": "T2", "lang": "fr", "unused": [1]}],
    )
    source = open_source(spec(path, prompt_template="Say {title}", passthrough=["lang"]))
    assert source.format == "jsonl"
    assert source.num_rows is None
    assert source.passthrough_schema == pa.schema([pa.field("lang", pa.string())])
    rows = all_rows(source, batch_size=1)
    assert rows == [
        Row(0, 1, "1", None, None, {"title": "T1", "lang": "en"}),
        Row(1, 2, "x", None, None, {"title": "T2", "lang": "fr"}),
    ]


def test_jsonl_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"prompt": "hi"}) + b"\n")
    assert all_rows(open_source(spec(path)))[0].prompt == "hi"


def test_messages_column_jsonl_with_content_parts(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "messages": msgs}])
    assert all_rows(open_source(spec(path, messages_column="messages")))[0].messages == msgs


def test_jsonl_passthrough_types_are_inferred(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "n": 1, "x": None}, {"prompt": "b", "n": 2, "x": None}])
    source = open_source(spec(path, passthrough=["n", "x"]))
    assert source.passthrough_schema == pa.schema([pa.field("n", pa.int64()), pa.field("x", pa.string())])


def test_jsonl_of_blank_lines_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n\n  \n")
    assert str(input_error(spec(path))) == f"{path}: the input has no rows"


@pytest.mark.parametrize(
    ("line_bytes", "words"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object but list"), (b'"text"', "not a JSON object")],
)
def test_bad_jsonl_line_aborts_naming_the_line(tmp_path: Path, line_bytes: bytes, words: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with path.open("ab") as f:
        f.write(b"\n" + line_bytes + b"\n")
    err = input_error(spec(path), rows=True)
    assert (err.path, err.line) == (path, 4)
    assert str(err).startswith(f"{path}, line 4: ")
    assert words in str(err)
    # check_ids sees it too, before anything is sent.
    err = input_error(spec(path, id_column="prompt"), ids=True)
    assert err.line == 4


def test_bad_jsonl_line_becomes_a_failed_row(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "p", "lang": "en"}\n{oops\n{"id": "c", "prompt": null, "lang": "fr"}\n')
    source = open_source(spec(path, on_bad_line="fail_row", passthrough=["lang"]))
    source.check_ids()
    rows = all_rows(source)
    assert [r.id for r in rows] == ["a", "<line 2>", "c"]
    assert rows[0].error is None
    assert rows[1].error is not None
    assert rows[1].error.startswith(f"{path}, line 2: not valid JSON")  # type: ignore[union-attr]
    assert rows[1].values["lang"] is None
    assert rows[2].error == f"{path}, line 3, column 'prompt': null prompt"
    assert rows[2].values == {"lang": "fr"}  # the reason is Row.error, not one of the values


def test_no_messages_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    err = input_error(spec(path, messages_column="msgs"))
    assert str(err).startswith(f"{path}, line 1, column 'msgs': no messages column")


@pytest.mark.parametrize(
    ("value", "words"),
    [(None, "null prompt"), (5, "must be a string, not int"), (["a"], "must be a string, not list")],
)
def test_jsonl_bad_prompt_names_line_and_column(tmp_path: Path, value: Any, words: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"prompt": value}])
    err = input_error(spec(path), rows=True)
    assert (err.line, err.column) == (2, "prompt")
    assert str(err) == f"{path}, line 2, column 'prompt': {'the prompt ' if 'must' in words else ''}{words}"


def test_jsonl_prompt_missing_in_a_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"text": "no"}])
    assert str(input_error(spec(path), rows=True)) == f"{path}, line 2, column 'prompt': missing prompt"


def test_jsonl_template_value_missing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "ok"}, {"title": None}])
    err = input_error(spec(path, prompt_template="{title}"), rows=True)
    assert (err.line, err.column) == (2, "title")


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hi"], "message 0 is not an object"),
        ([{"content": "x"}], "message 0 has no string 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], "message 1 has no 'content'"),
        ([{"role": "user", "content": 3}], "message 0 has no 'content'"),
    ],
)
def test_malformed_messages(tmp_path: Path, messages: Any, words: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, {"messages": messages}])
    err = input_error(spec(path, messages_column="messages"), rows=True)
    assert (err.path, err.line, err.column) == (path, 2, "messages")
    assert words in str(err)


def test_jsonl_passthrough_mixed_types_in_the_first_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "n": i} for i in range(3)] + [{"prompt": "p", "n": "three"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    err = input_error(spec(path, passthrough=["n"]))
    assert str(err) == f"{path}, line 4, column 'n': values of mixed types in a pass-through column"


def test_jsonl_passthrough_value_that_does_not_fit_later(tmp_path: Path) -> None:
    # Types come from the first 1024 rows; a later misfit names its line.
    rows: list[dict[str, Any]] = [{"prompt": "p", "n": i} for i in range(1100)]
    rows[1050]["n"] = "many"
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    source = open_source(spec(path, passthrough=["n"]))
    assert source.passthrough_schema == pa.schema([pa.field("n", pa.int64())])
    with pytest.raises(InputError) as info:
        all_rows(source, batch_size=100)
    assert str(info.value) == f"{path}, line 1051, column 'n': value does not fit the type int64 inferred from the first rows"
    failed = all_rows(open_source(spec(path, passthrough=["n"], on_bad_line="fail_row")))
    assert len(failed) == 1100
    assert failed[1050].values["n"] is None
    assert failed[1050].error == str(info.value)


def test_duplicate_ids_jsonl_names_the_first_few(tmp_path: Path) -> None:
    rows = [{"id": i % 8, "prompt": "p"} for i in range(16)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n" + b"".join(orjson.dumps(r) + b"\n" for r in rows))
    err = input_error(spec(path), ids=True)
    assert (err.line, err.column) == (10, "id")
    assert "'0' (lines 2, 10), '1' (lines 3, 11)" in str(err)
    assert "and 3 more" in str(err)


def test_check_reads_a_jsonl_input_once_and_finds_duplicates_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(orjson.dumps({"id": f"r{i % 900}", "prompt": "p"}).decode() + "\n" for i in range(1000)))
    with pytest.raises(InputError, match="duplicate ids"):
        open_source(spec(path)).check()
    path.write_text('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": null}\n')
    with pytest.raises(InputError, match="null prompt") as err:
        open_source(spec(path)).check()
    assert err.value.line == 2
