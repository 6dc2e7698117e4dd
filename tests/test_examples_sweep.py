"""jobs/sweep.example.toml then jobs/judge.example.toml, as a user runs them, on the built-in simulator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_sweep_example_then_the_judge_example(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("jobs/sweep.example.toml", "jobs/judge.example.toml", "sample_data/arith.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    sweep = run_cli(capsys, "run", "jobs/sweep.example.toml", "--no-progress")
    assert sweep.code == 0, sweep.err
    questions = len(Path("sample_data/arith.jsonl").read_text().splitlines())
    rows = pq.read_table("out/sweep.parquet").to_pylist()
    assert len(rows) == questions * 4 * 2 and {r["status"] for r in rows} == {"ok"}
    summary = json.loads(Path("out/sweep.parquet.summary.json").read_text())
    means = {v["name"]: v["scores"]["correct"]["mean"] for v in summary["variants"]}
    assert means["model=sim-large,temperature=0.0"] > means["model=sim-small,temperature=0.0"]
    assert "vs base   model=sim-large,temperature=0.0 is " in sweep.out

    judge = run_cli(capsys, "run", "jobs/judge.example.toml", "--no-progress")
    assert judge.code == 0, judge.err
    judged = pq.read_table("out/judge.parquet").to_pylist()
    # one judgement per row of the sweep, keyed by its request fingerprint
    assert sorted(r["id"] for r in judged) == sorted(r["request_fingerprint"] for r in rows)
    assert all(r["text"] in ("VERDICT: 0", "VERDICT: 1") for r in judged)
    # the score is parsed from the verdict and compared with the sweep's own check
    for r in judged:
        assert r["score_agrees"] == float(r["text"][-1] == str(int(r["score_correct"])))
    agreement = sum(r["score_agrees"] for r in judged) / len(judged)
    assert 0.8 < agreement < 1.0  # the simulated judge errs now and then, as its sums do
    assert "agrees" in judge.out
