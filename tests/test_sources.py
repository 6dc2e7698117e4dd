"""What every source shares: the format chosen, the file and columns checked, the ids checked."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batch.sources import FORMATS, JsonlSource, detect_format, open_source
from batch.spec import InputSpec
from tests.source_helpers import all_rows, input_error, spec, write_jsonl, write_parquet


def test_format_is_detected_by_content_when_the_suffix_says_nothing(tmp_path: Path) -> None:
    pq_path = write_parquet(tmp_path / "rows.data", {"prompt": ["a"]})
    jl_path = write_jsonl(tmp_path / "rows.txt", [{"prompt": "b"}])
    assert open_source(spec(pq_path)).format == "parquet"
    assert open_source(spec(jl_path)).format == "jsonl"


def test_missing_file(tmp_path: Path) -> None:
    err = input_error(spec(tmp_path / "nope.parquet"))
    assert str(err) == f"{tmp_path / 'nope.parquet'}: input file not found"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    assert str(input_error(spec(path))) == f"{path}: the input file is empty"


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


def test_unique_ids_pass(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "p"} for i in range(100)])
    open_source(spec(path)).check_ids()
    path = write_parquet(tmp_path / "in.parquet", {"id": list(range(100)), "prompt": ["p"] * 100})
    open_source(spec(path)).check_ids()


def test_null_id(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": ["a", None], "prompt": ["p", "q"]})
    assert str(input_error(spec(path), ids=True)) == f"{path}, line 2, column 'id': null id"
    assert str(input_error(spec(path), rows=True)) == f"{path}, line 2, column 'id': null id"
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p"}, {"prompt": "q"}])
    assert str(input_error(spec(path), ids=True)) == f"{path}, line 2, column 'id': missing or null id"
    assert str(input_error(spec(path), rows=True)) == f"{path}, line 2, column 'id': missing or null id"


@pytest.mark.parametrize("n", [0, 1, 2, 1000, 65_535, 65_536, 70_000])
def test_hashes_repeat_finds_one_repeat_at_any_size(n: int) -> None:
    # below 65,536 a Python set answers, above it Arrow sorts: both must agree
    from array import array

    from batch.arrowutil import hashes_repeat

    distinct = array("q", (hash(f"row-{i}") for i in range(n)))
    assert not hashes_repeat(distinct)
    if n >= 2:
        repeated = array("q", distinct)
        repeated[-1] = repeated[(n - 1) // 2]
        assert hashes_repeat(repeated)


# --- the format table ----------------------------------------------------------


def test_every_format_the_job_file_accepts_has_a_source() -> None:
    accepted = set(typing.get_args(typing.get_type_hints(InputSpec)["format"])) - {"auto"}
    assert set(FORMATS) == accepted
    for name, source in FORMATS.items():
        assert source.format == name


def test_a_format_added_to_the_table_is_chosen_by_its_ending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Lines(JsonlSource):
        format = "lines"
        suffixes = frozenset({".lines"})

    monkeypatch.setitem(FORMATS, "lines", Lines)
    path = write_jsonl(tmp_path / "in.lines", [{"prompt": "a"}])
    source = open_source(spec(path))
    assert isinstance(source, Lines)
    assert [row.prompt for row in all_rows(source)] == ["a"]


def test_a_format_given_in_the_job_wins_over_the_ending(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.parquet", [{"prompt": "a"}])
    assert detect_format(spec(path, format="jsonl")) == "jsonl"
    assert [row.prompt for row in all_rows(open_source(spec(path, format="jsonl")))] == ["a"]


# --- ids: one check for every source ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "missing or null id"),
        (True, "an id must be a string or a number, not bool true"),
        ([1, 2], "an id must be a string or a number, not list [1,2]"),
        ({"a": 1}, 'an id must be a string or a number, not dict {"a":1}'),
        ("x" * 60, None),
        (7, None),
        (1.5, None),
    ],
)
def test_a_json_id_that_is_null_boolean_list_or_object_is_refused(tmp_path: Path, value: Any, words: str | None) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p"}, {"id": value, "prompt": "q"}])
    if words is None:
        assert [r.id for r in all_rows(open_source(spec(path)))] == ["a", str(value)]
        return
    for checked in ({"ids": True}, {"rows": True}):
        err = input_error(spec(path), **checked)
        assert str(err) == f"{path}, line 2, column 'id': {words}"
    rows = all_rows(open_source(spec(path, on_bad_line="fail_row")))
    assert [r.id for r in rows] == ["a", "<line 2>"]
    assert rows[1].error == f"{path}, line 2, column 'id': {words}"


@pytest.mark.parametrize(
    ("column", "words"),
    [(pa.array([True, False]), "not bool"), (pa.array([[1], [2]]), "not list<element: int64>"),
     (pa.array([{"a": 1}, {"a": 2}]), "not struct<a: int64>")],
)
def test_an_arrow_id_column_of_booleans_lists_or_structs_is_refused(tmp_path: Path, column: pa.Array,
                                                                      words: str) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": column, "prompt": ["p", "q"]})
    for fail_rows in ("abort", "fail_row"):  # the whole column is wrong: no row could be sent
        err = input_error(spec(path, on_bad_line=fail_rows))
        assert str(err) == f"{path}, line 1, column 'id': an id must be a string or a number, {words}"


def test_a_null_parquet_id_with_fail_row_is_an_error_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"id": ["a", None, "c"], "prompt": ["p", "q", "r"]})
    source = open_source(spec(path, on_bad_line="fail_row"))
    source.check()
    rows = all_rows(source)
    assert [r.id for r in rows] == ["a", "<line 2>", "c"]
    assert [r.error for r in rows] == [None, f"{path}, line 2, column 'id': null id", None]
    assert rows[1].prompt is None and rows[1].messages is None
