"""The reader: rows out of Parquet and JSONL, and one clear line for every bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import InputError
from batch.reader import ERROR_KEY, InputReader, row_error
from batch.records import Row
from batch.spec import InputSpec


def spec(path: Path, **fields: Any) -> InputSpec:
    return InputSpec(path=path, **fields)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def write_parquet(path: Path, columns: dict[str, Any], **kwargs: Any) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def all_rows(reader: InputReader, batch_size: int = 1024) -> list[Row]:
    return [row for batch in reader.batches(batch_size) for row in batch]


def input_error(input_spec: InputSpec, *, rows: bool = False, ids: bool = False) -> InputError:
    with pytest.raises(InputError) as info:
        reader = InputReader(input_spec)
        if ids:
            reader.check_ids()
        if rows:
            all_rows(reader)
    return info.value


# --- good inputs --------------------------------------------------------------


def test_parquet_rows(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "in.parquet",
        {"id": ["a", "b", "c"], "prompt": ["p1", "p2", "p3"], "lang": ["en", "fr", None], "other": [1, 2, 3]},
        row_group_size=2,
    )
    reader = InputReader(spec(path, passthrough=["lang"]))
    assert reader.format == "parquet"
    assert reader.num_rows == 3
    assert reader.passthrough_schema == pa.schema([pa.field("lang", pa.string())])
    batches = list(reader.batches(2))
    assert [len(b) for b in batches] == [2, 1]
    rows = [r for b in batches for r in b]
    assert rows[0] == Row(0, 1, "a", "p1", None, {"lang": "en"})
    assert rows[2] == Row(2, 3, "c", "p3", None, {"lang": None})
    # Each call starts again from the top.
    assert all_rows(reader) == rows


def test_parquet_reads_only_the_columns_it_needs(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["p"], "big": ["x" * 1000]})
    rows = all_rows(InputReader(spec(path)))
    assert rows[0].values == {}
    assert InputReader(spec(path))._needed() == ["prompt"]


def test_parquet_integer_ids_become_strings(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": [10, 20], "prompt": ["a", "b"]})
    assert [r.id for r in all_rows(InputReader(spec(path)))] == ["10", "20"]


def test_without_an_id_column_the_row_index_is_the_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with path.open("ab") as f:
        f.write(b"\n   \n" + orjson.dumps({"prompt": "c"}) + b"\n")
    reader = InputReader(spec(path))
    reader.check_ids()
    rows = all_rows(reader)
    assert [(r.index, r.line, r.id, r.prompt) for r in rows] == [(0, 1, "0", "a"), (1, 2, "1", "b"), (2, 5, "2", "c")]


def test_jsonl_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": 1, "title": "T1", "lang": "en"}, {"id": "x", "title": "T2", "lang": "fr", "unused": [1]}],
    )
    reader = InputReader(spec(path, prompt_template="Say {title}", passthrough=["lang"]))
    assert reader.format == "jsonl"
    assert reader.num_rows is None
    assert reader.passthrough_schema == pa.schema([pa.field("lang", pa.string())])
    rows = all_rows(reader, batch_size=1)
    assert rows == [
        Row(0, 1, "1", None, None, {"title": "T1", "lang": "en"}),
        Row(1, 2, "x", None, None, {"title": "T2", "lang": "fr"}),
    ]


def test_jsonl_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"prompt": "hi"}) + b"\n")
    assert all_rows(InputReader(spec(path)))[0].prompt == "hi"


def test_format_is_detected_by_content_when_the_suffix_says_nothing(tmp_path: Path) -> None:
    pq_path = write_parquet(tmp_path / "rows.data", {"prompt": ["a"]})
    jl_path = write_jsonl(tmp_path / "rows.txt", [{"prompt": "b"}])
    assert InputReader(spec(pq_path)).format == "parquet"
    assert InputReader(spec(jl_path)).format == "jsonl"


def test_messages_column_parquet(tmp_path: Path) -> None:
    messages = [
        [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u", "name": "bob"}],
    ]
    path = write_parquet(tmp_path / "in.parquet", {"messages": messages})
    rows = all_rows(InputReader(spec(path, messages_column="messages")))
    assert rows[0].prompt is None
    assert rows[0].messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob"}]


def test_messages_column_jsonl_with_content_parts(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "messages": msgs}])
    assert all_rows(InputReader(spec(path, messages_column="messages")))[0].messages == msgs


def test_jsonl_passthrough_types_are_inferred(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "n": 1, "x": None}, {"prompt": "b", "n": 2, "x": None}])
    reader = InputReader(spec(path, passthrough=["n", "x"]))
    assert reader.passthrough_schema == pa.schema([pa.field("n", pa.int64()), pa.field("x", pa.string())])


# --- bad files ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    err = input_error(spec(tmp_path / "nope.parquet"))
    assert str(err) == f"{tmp_path / 'nope.parquet'}: input file not found"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    assert str(input_error(spec(path))) == f"{path}: the input file is empty"


def test_jsonl_of_blank_lines_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n\n  \n")
    assert str(input_error(spec(path))) == f"{path}: the input has no rows"


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": pa.array([], pa.string())})
    assert str(input_error(spec(path))) == f"{path}: the input has no rows"


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_bytes(b"id,prompt\n1,hello\n")
    err = input_error(spec(path))
    assert err.path == path
    assert str(err).startswith(f"{path}: not a Parquet file, or truncated")


def test_truncated_parquet(tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "good.parquet", {"prompt": ["x" * 100] * 100})
    path = tmp_path / "in.parquet"
    path.write_bytes(good.read_bytes()[:-40])
    assert str(input_error(spec(path))).startswith(f"{path}: not a Parquet file, or truncated")


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
    reader = InputReader(spec(path, on_bad_line="fail_row", passthrough=["lang"]))
    reader.check_ids()
    rows = all_rows(reader)
    assert [r.id for r in rows] == ["a", "<line 2>", "c"]
    assert row_error(rows[0]) is None
    assert row_error(rows[1]) is not None
    assert row_error(rows[1]).startswith(f"{path}, line 2: not valid JSON")  # type: ignore[union-attr]
    assert rows[1].values["lang"] is None
    assert row_error(rows[2]) == f"{path}, line 3, column 'prompt': null prompt"
    assert rows[2].values == {"lang": "fr", ERROR_KEY: row_error(rows[2])}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_no_prompt_column(tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        path = write_parquet(tmp_path / "in.parquet", {"id": ["a"], "text": ["t"]})
        where = f"{path}, column 'prompt'"
    else:
        path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "t"}])
        where = f"{path}, line 1, column 'prompt'"
    err = input_error(spec(path))
    assert err.column == "prompt"
    assert str(err).startswith(f"{where}: no prompt column")
    assert "id, text" in str(err)


def test_no_messages_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    err = input_error(spec(path, messages_column="msgs"))
    assert str(err).startswith(f"{path}, line 1, column 'msgs': no messages column")


def test_template_column_missing(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"title": ["t"]})
    err = input_error(spec(path, prompt_template="{title} {body}"))
    assert str(err) == f"{path}, column 'body': prompt_template uses {{body}} but the input has no such column"


def test_passthrough_column_missing(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["p"]})
    err = input_error(spec(path, passthrough=["lang"]))
    assert str(err) == f"{path}, column 'lang': pass-through column missing from the input"


def test_explicit_id_column_missing(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["p"]})
    err = input_error(spec(path, id_column="uid"))
    assert str(err) == f"{path}, column 'uid': id column missing from the input"


def test_parquet_prompt_column_of_the_wrong_type(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": [1, 2]})
    err = input_error(spec(path))
    assert str(err) == f"{path}, column 'prompt': the prompt column must hold strings, not int64"


def test_parquet_messages_column_of_the_wrong_type(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"messages": ["hello"]})
    err = input_error(spec(path, messages_column="messages"))
    assert err.column == "messages"
    assert "lists of {role, content} structs" in str(err)


def test_parquet_null_prompt_names_the_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", "b", None, "d"]}, row_group_size=2)
    err = input_error(spec(path), rows=True)
    assert str(err) == f"{path}, line 3, column 'prompt': null prompt"


def test_parquet_null_prompt_as_a_failed_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", None]})
    rows = all_rows(InputReader(spec(path, on_bad_line="fail_row")))
    assert row_error(rows[1]) == f"{path}, line 2, column 'prompt': null prompt"
    assert rows[1].id == "1"


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


def test_parquet_template_value_null(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"title": ["ok", None]})
    err = input_error(spec(path, prompt_template="{title}"), rows=True)
    assert str(err) == f"{path}, line 2, column 'title': null value used by prompt_template"


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


def test_parquet_malformed_messages(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "in.parquet",
        {"messages": [[{"role": "user", "content": "ok"}], [{"role": None, "content": "x"}]]},
    )
    err = input_error(spec(path, messages_column="messages"), rows=True)
    assert str(err) == f"{path}, line 2, column 'messages': message 0 has no string 'role'"


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
    reader = InputReader(spec(path, passthrough=["n"]))
    assert reader.passthrough_schema == pa.schema([pa.field("n", pa.int64())])
    with pytest.raises(InputError) as info:
        all_rows(reader, batch_size=100)
    assert str(info.value) == f"{path}, line 1051, column 'n': value does not fit the type int64 inferred from the first rows"
    failed = all_rows(InputReader(spec(path, passthrough=["n"], on_bad_line="fail_row")))
    assert len(failed) == 1100
    assert failed[1050].values["n"] is None
    assert row_error(failed[1050]) == str(info.value)


# --- ids ------------------------------------------------------------------------


def test_duplicate_ids_parquet(tmp_path: Path) -> None:
    ids = ["a", "b", "a", "c", "b", "a"] + [f"u{i}" for i in range(10)]
    path = write_parquet(tmp_path / "in.parquet", {"id": ids, "prompt": ["p"] * len(ids)})
    err = input_error(spec(path), ids=True)
    assert (err.path, err.line, err.column) == (path, 3, "id")
    assert str(err) == (
        f"{path}, line 3, column 'id': duplicate ids: 'a' (rows 1, 3, 6), 'b' (rows 2, 5); every id must be unique"
    )


def test_duplicate_ids_jsonl_names_the_first_few(tmp_path: Path) -> None:
    rows = [{"id": i % 8, "prompt": "p"} for i in range(16)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n" + b"".join(orjson.dumps(r) + b"\n" for r in rows))
    err = input_error(spec(path), ids=True)
    assert (err.line, err.column) == (10, "id")
    assert "'0' (lines 2, 10), '1' (lines 3, 11)" in str(err)
    assert "and 3 more" in str(err)


def test_unique_ids_pass(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "p"} for i in range(100)])
    InputReader(spec(path)).check_ids()
    path = write_parquet(tmp_path / "in.parquet", {"id": list(range(100)), "prompt": ["p"] * 100})
    InputReader(spec(path)).check_ids()


def test_null_id(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": ["a", None], "prompt": ["p", "q"]})
    assert str(input_error(spec(path), ids=True)) == f"{path}, line 2, column 'id': null id"
    assert str(input_error(spec(path), rows=True)) == f"{path}, line 2, column 'id': null id"
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p"}, {"prompt": "q"}])
    assert str(input_error(spec(path), ids=True)) == f"{path}, line 2, column 'id': missing or null id"
    assert str(input_error(spec(path), rows=True)) == f"{path}, line 2, column 'id': missing or null id"


@pytest.mark.parametrize("statistics", [True, False], ids=["with-statistics", "without-statistics"])
@pytest.mark.parametrize(("column", "words"), [("prompt", "null prompt"), ("id", "null id")])
def test_check_rows_finds_a_null_deep_in_a_parquet_file_before_anything_is_sent(
    tmp_path: Path, column: str, words: str, statistics: bool
) -> None:
    # with statistics only the row groups' null counts are read unless one says there are nulls
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(70_000)]
    rows[68_000][column] = None
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10_000, write_statistics=statistics)
    reader = InputReader(spec(path))
    with pytest.raises(InputError) as err:
        reader.check_rows()
    assert (err.value.line, err.value.column) == (68_001, column)
    assert words in str(err.value)


def test_check_reads_a_jsonl_input_once_and_finds_duplicates_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(orjson.dumps({"id": f"r{i % 900}", "prompt": "p"}).decode() + "\n" for i in range(1000)))
    with pytest.raises(InputError, match="duplicate ids"):
        InputReader(spec(path)).check()
    path.write_text('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": null}\n')
    with pytest.raises(InputError, match="null prompt") as err:
        InputReader(spec(path)).check()
    assert err.value.line == 2


@pytest.mark.parametrize("n", [0, 1, 2, 1000, 65_535, 65_536, 70_000])
def test_hashes_repeat_finds_one_repeat_at_any_size(n: int) -> None:
    # below 65,536 a Python set answers, above it Arrow sorts: both must agree
    from array import array

    from batch.reader import hashes_repeat

    distinct = array("q", (hash(f"row-{i}") for i in range(n)))
    assert not hashes_repeat(distinct)
    if n >= 2:
        repeated = array("q", distinct)
        repeated[-1] = repeated[(n - 1) // 2]
        assert hashes_repeat(repeated)
