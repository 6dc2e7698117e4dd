"""A budget at half a job's cost: how close to it the job stops, and by how much it overshoots.

    python benchmarks/budget.py                      # 20,000 rows on the simulator
    python benchmarks/budget.py --rows 2000 --share 0.3 --sweep-rows 0

Plans the job (``promptmill plan``) for its cost, runs it once to measure the real
cost, then runs it again into a new output with ``--budget-usd`` at ``share`` of that
cost, and prints spent / budget, the rows done and the overshoot in dollars. Then the
same for a sweep (``--sweep-rows`` rows x 2 models x 2 samples): spent / budget and
the rows each variant got before the stop (the requests go row by row).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def _promptmill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True, timeout=900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--share", type=float, default=0.5, help="the budget as a share of the job's real cost")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sweep-rows", type=int, default=2_000, help="input rows of the sweep line (0: none)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = d / "in.jsonl"
        inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Write a line about item {i} " * (1 + i % 7)}) + "\n"
                               for i in range(a.rows)))
        job = d / "job.toml"
        job.write_text(f'[input]\npath = "{inp}"\n[api]\nbase_url = "simulator"\n[request]\n'
                       f'model = "simulator-small"\nmax_tokens = 48\n[limits]\nconcurrency = {a.concurrency}\n'
                       '[simulator]\nlatency_ms = 5\n')
        common = ["--no-progress", "-q"]
        planned = json.loads(_promptmill("plan", str(job), "--output", str(d / "full.parquet"), "--json", "-").stdout)
        full = _promptmill("run", str(job), "--output", str(d / "full.parquet"), *common)
        assert full.returncode == 0, full.stderr
        cost = sum(pq.read_table(d / "full.parquet", columns=["cost_usd"])["cost_usd"].to_pylist())
        budget = cost * a.share
        started = time.perf_counter()
        run = _promptmill("run", str(job), "--output", str(d / "half.parquet"), "--budget-usd", repr(budget),
                          "--summary-json", str(d / "half.json"), *common)
        wall = time.perf_counter() - started
        table = pq.read_table(d / "half.parquet", columns=["id", "cost_usd"])
        spent = sum(table["cost_usd"].to_pylist())
        summary = json.loads((d / "half.json").read_text())
    print(f"job: {a.rows:,} rows, real cost ${cost:.6f}; plan said ceiling ${planned['total']['cost_ceiling_usd']:.6f}")
    print(f"budget {a.share:.0%}: exit {run.returncode}, spent / budget ${spent:.6f} / ${budget:.6f} "
          f"({spent / budget:.1%}), rows done {table.num_rows:,} of {a.rows:,} in {wall:.1f} s")
    print(f"overshoot ${max(spent - budget, 0.0):.9f}; summary cost ${summary['totals']['cost_usd']:.6f} "
          f"(output sum ${spent:.6f})")
    ok = run.returncode == 4 and spent <= budget + 1e-12
    if a.sweep_rows:
        ok = _sweep(a.sweep_rows, a.share, a.concurrency) and ok
    return 0 if ok else 1


def _sweep(rows: int, share: float, concurrency: int) -> bool:
    """A 2-model x 2-sample sweep stopped at ``share`` of its real cost: spent / budget and rows per variant."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = d / "in.jsonl"
        inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?"}) + "\n"
                               for i in range(rows)))
        job = d / "sweep.toml"
        job.write_text(f'[input]\npath = "{inp}"\n[api]\nbase_url = "simulator"\n[request]\nmodel = "sim-small"\n'
                       f'max_tokens = 16\n[limits]\nconcurrency = {concurrency}\n'
                       '[pricing.sim-small]\ninput = 0.1\noutput = 0.2\n[pricing.sim-large]\ninput = 0.6\n'
                       'output = 1.2\n[sweep]\nsamples = 2\n[sweep.grid]\nmodel = ["sim-small", "sim-large"]\n'
                       '[simulator]\nlatency_ms = 5\n')
        full = _promptmill("run", str(job), "--output", str(d / "full.parquet"), "--no-progress", "-q")
        assert full.returncode == 0, full.stderr
        cost = sum(pq.read_table(d / "full.parquet", columns=["cost_usd"])["cost_usd"].to_pylist())
        budget = cost * share
        run = _promptmill("run", str(job), "--output", str(d / "half.parquet"), "--budget-usd", repr(budget),
                          "--no-progress", "-q")
        table = pq.read_table(d / "half.parquet", columns=["variant", "cost_usd"])
    spent = sum(table["cost_usd"].to_pylist())
    per = collections.Counter(table["variant"].to_pylist())
    print(f"sweep: {rows:,} rows x 2 models x 2 samples, real cost ${cost:.6f}; budget {share:.0%}: exit "
          f"{run.returncode}, spent / budget ${spent:.6f} / ${budget:.6f}, overshoot ${max(spent - budget, 0.0):.9f}; "
          f"rows per variant {', '.join(f'{v} {n:,}' for v, n in sorted(per.items()))}")
    return run.returncode == 4 and spent <= budget + 1e-12


if __name__ == "__main__":
    raise SystemExit(main())
