"""The output store: durable parts, atomic assembly, newest-row-wins, the resume index, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import store as out
from batch.errors import OutputBusy, OutputError
from batch.records import Result

ROOT = Path(__file__).resolve().parents[1]
PASS = pa.schema([pa.field("topic", pa.string())])


def result(i: int, status: str = "ok", fp: str = "fp1", **kw: object) -> Result:
    fields: dict[str, object] = dict(
        index=i, id=f"r{i}", passthrough={"topic": f"t{i}"}, fingerprint=fp, model="m", endpoint="chat",
        status=status, text=f"answer {i}" if status == "ok" else None, prompt_tokens=3, completion_tokens=5,
        total_tokens=8, cost_usd=0.001, attempts=1, http_status=200,
        created=datetime(2024, 1, 1, tzinfo=UTC),
    )
    fields.update(kw)
    return Result(**fields)  # type: ignore[arg-type]


def one_part(output: Path, schema: pa.Schema, *results: Result) -> None:
    """``results`` written as one part of run 1, as a run leaves them."""
    w = out.PartWriter(output, schema, run=1)
    for r in results:
        w.add(r)
    w.flush()


def test_schema_has_every_column_in_order() -> None:
    schema = out.output_schema(PASS)
    assert schema.names == [
        "id", "topic", "model", "endpoint", "status", "text", "refusal", "finish_reason", "prompt_tokens",
        "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "cost_usd",
        "latency_s", "ttft_s", "attempts", "http_status", "error_code", "error", "response_id",
        "created", "system_fingerprint", "request_fingerprint", "variant", "sample", "params", "finished_at",
    ]
    assert schema.field("created").type == pa.timestamp("us", tz="UTC")
    assert schema.field("prompt_tokens").type == pa.int64()


def test_parts_are_whole_files_and_assembly_keeps_types_when_columns_are_null(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    w = out.PartWriter(output, schema, run=1)
    for i in range(3):
        w.add(result(i))
    w.flush()
    w.add(result(3, status="failed", error="boom", http_status=500))
    w.flush()
    parts = sorted(out.parts_dir(output).glob("run-*"))
    assert len(parts) == 2
    assert not list(out.parts_dir(output).glob(".*tmp"))  # no temporary left behind

    assert out.assemble(output, schema) == 4
    table = pq.read_table(output)
    assert table.schema.remove_metadata() == schema.remove_metadata()
    assert table["id"].to_pylist() == ["r0", "r1", "r2", "r3"]
    assert table["reasoning_tokens"].null_count == 4  # all null, still typed int64
    assert table["status"].to_pylist() == ["ok", "ok", "ok", "failed"]
    assert not list(out.parts_dir(output).glob("run-*"))


def test_newest_row_of_an_id_wins_across_runs(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    w1 = out.PartWriter(output, schema, run=1)
    w1.add(result(0))
    w1.add(result(1, status="failed", error="503"))
    w1.flush()
    out.assemble(output, schema)
    w2 = out.PartWriter(output, schema, run=out.next_run_number(output))
    w2.add(result(1))  # the rerun fixed row 1
    w2.flush()
    out.assemble(output, schema)
    table = pq.read_table(output)
    assert sorted(table["id"].to_pylist()) == ["r0", "r1"]
    assert table["status"].to_pylist() == ["ok", "ok"]


def test_resume_index_skips_ok_rows_with_the_same_request_only(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    one_part(output, schema, result(0, fp="a"), result(1, status="failed", fp="a"))
    index = out.load_index(output)
    assert ("r0", "a") in index
    assert ("r0", "b") not in index  # the request changed: redo
    assert ("r1", "a") not in index  # failed rows are retried by default
    assert index.rows_ok == 1 and index.rows_failed == 1
    kept = out.load_index(output, include_failed=True)
    assert ("r1", "a") in kept and ("r0", "a") in kept and ("r1", "b") not in kept
    assert kept.failed_skipped == 1  # one lookup found a failed row


def test_empty_index_when_nothing_was_done(tmp_path: Path) -> None:
    index = out.load_index(tmp_path / "none.parquet")
    assert len(index) == 0
    assert ("x", "y") not in index


def test_lock_refuses_a_second_run_and_is_released(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    first = out.OutputLock(output)
    first.acquire()
    # flock locks belong to the open file description, so a second open in this process conflicts too
    with pytest.raises(OutputBusy, match="another promptmill run is writing this output"):
        out.OutputLock(output).acquire()
    first.release()
    with out.OutputLock(output):
        pass


def test_lock_of_a_killed_process_does_not_stick(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    code = (
        "import os, sys; from pathlib import Path; from batch.store import OutputLock;"
        f"OutputLock(Path({str(output)!r})).acquire(); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == -9  # died holding the lock
    with out.OutputLock(output):
        pass


def test_unwritable_output_folder_is_reported_before_anything_runs(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder") as err:
        out.check_output_writable(blocker / "sub" / "res.parquet")
    assert str(blocker / "sub") in str(err.value)


def test_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a folder"):
        out.check_output_writable(tmp_path)


def test_job_identity_round_trips_through_parts_and_output_metadata(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    ident = {"job": "j", "input": "/data/in.jsonl", "id_column": "id"}
    out.write_job_identity(output, ident)
    assert out.read_job_identity(output) == ident
    import json

    schema = out.output_schema(PASS, {out.METADATA_KEY: json.dumps({"identity": ident}).encode()})
    one_part(output, schema, result(0))
    out.assemble(output, schema)
    out.remove_parts_dir(output)
    assert out.read_job_identity(output) == ident


def test_fresh_discards_parts_and_output(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS, {out.METADATA_KEY: b"{}"})  # what every run writes: promptmill's metadata
    one_part(output, schema, result(0))
    out.assemble(output, schema)
    out.discard_progress(output)
    assert not output.exists()
    assert len(out.load_index(output)) == 0


def test_assembly_gathers_small_parts_into_large_row_groups(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    w = out.PartWriter(output, schema, run=1)
    for part in range(40):
        for i in range(25):
            w.add(result(part * 25 + i))
        w.flush()
    assert out.assemble(output, schema) == 1000
    meta = pq.ParquetFile(output).metadata
    assert meta.num_rows == 1000
    assert meta.num_row_groups == 1  # not 40 row groups of 25 rows


def test_parquet_parts_of_an_earlier_version_are_still_resumed_and_assembled(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    one_part(output, schema, result(0))
    older = out.PartWriter(output, schema, run=2)
    older.add(result(1))
    pq.write_table(older.take(), out.parts_dir(output) / "run-0002-part-000001.parquet")
    assert sorted(p.suffix for p in out.parts_dir(output).glob("run-*")) == [".arrow", ".parquet"]

    assert out.load_index(output).rows_ok == 2
    assert out.assemble(output, schema) == 2
    assert sorted(pq.read_table(output)["id"].to_pylist()) == ["r0", "r1"]


def test_a_row_no_column_can_hold_is_written_failed_and_the_rest_of_its_part_kept(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    schema = out.output_schema(PASS)
    w = out.PartWriter(output, schema, run=1)
    w.add(result(0))
    w.add(result(1, prompt_tokens=2**64 - 1, text="paid for"))
    w.add(result(2, text="bad \ud800 text"))
    w.add(result(3))
    w.flush()
    out.assemble(output, schema)
    rows = {r["id"]: r for r in pq.read_table(output).to_pylist()}
    assert [rows[f"r{i}"]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert rows["r1"]["error_code"] == "bad_response"
    assert "column 'prompt_tokens' cannot hold 18446744073709551615" in rows["r1"]["error"]
    assert rows["r1"]["topic"] == "t1" and rows["r1"]["request_fingerprint"] == "fp1"
    assert "column 'text' cannot hold" in rows["r2"]["error"]
    assert rows["r3"]["text"] == "answer 3"


# -- the store: one object for the whole protocol --------------------------------------


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every file and folder fsynced from now on."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fsynced file")
def test_every_file_the_store_writes_is_fsynced_with_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch.summary import Summary

    output = tmp_path / "res.parquet"
    parts = out.parts_dir(output)
    seen = _fsynced(monkeypatch)
    schema = out.output_schema(PASS, {out.METADATA_KEY: b"{}"})
    with out.OutputStore.open(output, {"job": "j"}, schema) as store:
        store.add(result(0))
        store.flush()
        assert store.assemble() == 1
        store.write_summary(Summary(job="j", output=str(output)))
    # each file under its temporary name, then the folder its rename is in
    for folder, name in ((parts, ".job.json.tmp"), (parts, ".run-0001-part-000001.arrow.tmp"),
                         (tmp_path, ".res.parquet.tmp"), (tmp_path, ".res.parquet.summary.json.tmp")):
        at = seen.index(str(folder / name))
        assert str(folder) in seen[at + 1:], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.parquet", "res.parquet.summary.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from batch.store.atomic import atomic_write

    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    def half_then_fail(fh: Any) -> None:
        fh.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_the_store_refuses_another_jobs_output_unless_fresh(tmp_path: Path) -> None:
    output = tmp_path / "res.parquet"
    schema = out.output_schema(PASS)
    with pytest.raises(RuntimeError), out.OutputStore.open(output, {"job": "a"}, schema) as store:
        store.add(result(0))
        store.flush()
        raise RuntimeError("the run stops before assembling")
    assert out.read_job_identity(output) == {"job": "a"}  # its progress and identity are kept
    with pytest.raises(OutputError, match="written by another job \\('a'"):
        out.OutputStore.open(output, {"job": "b"}, schema)
    with out.OutputStore.open(output, {"job": "a"}, schema) as store:  # the lock was released
        assert len(store.index) == 1 and ("r0", "fp1") in store.index
    with out.OutputStore.open(output, {"job": "b"}, schema, fresh=True) as store:
        assert len(store.index) == 0
        with pytest.raises(OutputBusy, match="another promptmill run is writing this output"):
            out.OutputStore.open(output, {"job": "b"}, schema)
        store.assemble()
    assert not out.parts_dir(output).exists()  # closed without an error: the parts folder is gone
    assert pq.read_table(output).num_rows == 0
