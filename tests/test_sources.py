"""What every source shares: the format chosen, the file and columns checked, the ids checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.sources import open_source
from tests.source_helpers import input_error, spec, write_jsonl, write_parquet


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

