"""The Parquet source: rows in record batches, and one clear line for every bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import InputError
from batch.records import Row
from batch.sources import open_source
from tests.source_helpers import all_rows, input_error, spec, write_parquet


def test_parquet_rows(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "in.parquet",
        {"id": ["a", "b", "c"], "prompt": ["p1", "p2", "p3"], "lang": ["en", "fr", None], "other": [1, 2, 3]},
        row_group_size=2,
    )
    source = open_source(spec(path, passthrough=["lang"]))
    assert source.format == "parquet"
    assert source.num_rows == 3
    assert source.passthrough_schema == pa.schema([pa.field("lang", pa.string())])
    batches = list(source.batches(2))
    assert [len(b) for b in batches] == [2, 1]
    rows = [r for b in batches for r in b]
    assert rows[0] == Row(0, 1, "a", "p1", None, {"lang": "en"})
    assert rows[2] == Row(2, 3, "c", "p3", None, {"lang": None})
    # Each call starts again from the top.
    assert all_rows(source) == rows


def test_parquet_reads_only_the_columns_it_needs(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["p"], "big": ["x" * 1000]})
    rows = all_rows(open_source(spec(path)))
    assert rows[0].values == {}
    assert open_source(spec(path))._needed() == ["prompt"]


def test_parquet_integer_ids_become_strings(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": [10, 20], "prompt": ["a", "b"]})
    assert [r.id for r in all_rows(open_source(spec(path)))] == ["10", "20"]


def test_messages_column_parquet(tmp_path: Path) -> None:
    messages = [
        [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u", "name": "bob"}],
    ]
    path = write_parquet(tmp_path / "in.parquet", {"messages": messages})
    rows = all_rows(open_source(spec(path, messages_column="messages")))
    assert rows[0].prompt is None
    assert rows[0].messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob"}]


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
    rows = all_rows(open_source(spec(path, on_bad_line="fail_row")))
    assert rows[1].error == f"{path}, line 2, column 'prompt': null prompt"
    assert rows[1].id == "1"


def test_parquet_template_value_null(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"title": ["ok", None]})
    err = input_error(spec(path, prompt_template="{title}"), rows=True)
    assert str(err) == f"{path}, line 2, column 'title': null value used by prompt_template"


def test_parquet_malformed_messages(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "in.parquet",
        {"messages": [[{"role": "user", "content": "ok"}], [{"role": None, "content": "x"}]]},
    )
    err = input_error(spec(path, messages_column="messages"), rows=True)
    assert str(err) == f"{path}, line 2, column 'messages': message 0 has no string 'role'"


def test_duplicate_ids_parquet(tmp_path: Path) -> None:
    ids = ["a", "b", "a", "c", "b", "a"] + [f"u{i}" for i in range(10)]
    path = write_parquet(tmp_path / "in.parquet", {"id": ids, "prompt": ["p"] * len(ids)})
    err = input_error(spec(path), ids=True)
    assert (err.path, err.line, err.column) == (path, 3, "id")
    assert str(err) == (
        f"{path}, line 3, column 'id': duplicate ids: 'a' (rows 1, 3, 6), 'b' (rows 2, 5); every id must be unique"
    )


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
    source = open_source(spec(path))
    with pytest.raises(InputError) as err:
        source.check_rows()
    assert (err.value.line, err.value.column) == (68_001, column)
    assert words in str(err.value)
