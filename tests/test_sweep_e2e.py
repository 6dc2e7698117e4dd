"""Sweeps end to end on the simulator: every (id, variant, sample) once, with its own parameters."""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.simulator import SimServer
from batch.variants import sample_seed
from tests.helpers import run_cli, write_jsonl

ROWS = [{"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?", "answer": 3 * i} for i in range(5)]


def _job(tmp_path: Path, sim: SimServer, extra_variant: str = "") -> Path:
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "{inp}"
[output]
path = "{tmp_path / 'out.parquet'}"
[api]
base_url = "{sim.base_url}"
[request]
model = "sim-small"
max_tokens = 16
[sweep]
samples = 3
[sweep.grid]
model = ["sim-small", "sim-large"]
temperature = [0.0, 0.7]
[[sweep.score]]
name = "correct"
kind = "number"
reference = "answer"
{extra_variant}
""")
    return job


def test_a_2x2x3_grid_gives_12_rows_per_id_each_sent_with_its_parameters(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_cli(capsys, "run", _job(tmp_path, sim), "--no-progress")
    assert run.code == 0, run.err
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    per_id = collections.Counter(r["id"] for r in rows)
    assert per_id == {r["id"]: 12 for r in ROWS}
    assert all(r["status"] == "ok" for r in rows)
    keys = {(r["id"], r["variant"], r["sample"]) for r in rows}
    assert len(keys) == 60
    for r in rows:
        model = r["variant"].split(",")[0].removeprefix("model=")
        assert r["model"] == model
        assert f"temperature={r['params'].split('temperature')[1][2:5]}" in r["variant"]
        assert r["score_correct"] == (1.0 if r["text"] == f"The answer is {r['answer']}." else 0.0)
    seen = sim.stats["params_seen"]
    assert len(seen) == 60
    sent = collections.Counter((b["model"], b["temperature"], b["seed"]) for b in seen)
    expected = collections.Counter((m, t, sample_seed(r["id"], s)) for r in ROWS for m in ("sim-small", "sim-large")
                                   for t in (0.0, 0.7) for s in range(3))
    assert sent == expected


def test_adding_a_variant_sends_only_its_requests(
        tmp_path: Path, sim: SimServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "run", _job(tmp_path, sim), "--no-progress").code == 0
    before = len(sim.stats["params_seen"])
    job = _job(tmp_path, sim, '[[sweep.variant]]\nname = "top"\nmodel = "sim-large"\ntop_p = 0.5\n')
    assert run_cli(capsys, "run", job, "--no-progress").code == 0
    new = sim.stats["params_seen"][before:]
    assert len(new) == 15 and all(b.get("top_p") == 0.5 for b in new)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 75 and len({(r["id"], r["variant"], r["sample"]) for r in rows}) == 75
    meta = pq.read_schema(tmp_path / "out.parquet").metadata[b"promptmill.job"]
    assert b'"baseline":"model=sim-small,temperature=0.0"' in meta and b'"name":"top"' in meta
