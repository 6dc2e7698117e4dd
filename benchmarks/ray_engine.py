"""promptmill on Ray beside Ray Data LLM's own HTTP processor, same simulator, same rows, one run.

Needs the ``ray`` extra and pydantic (``ray.data.llm`` imports it):

    pip install -e '.[ray]' pydantic
    python benchmarks/ray_engine.py                   # 3,000 rows a scenario (about 8 min on 2 cores)
    python benchmarks/ray_engine.py --quick           # 600 rows a scenario

Scenarios (the built-in simulator, in this process, on loopback):

* ``latency``: every answer after 200 ms; rows/s and wall / ideal (rows x 0.2 s / concurrency);
* ``limit``: the server allows ``rpm`` requests a minute (in a 10 s window); promptmill is
  told the limit, Ray Data LLM gets ``qps = rpm / 60 / workers`` per actor (its pacing is per
  actor); the 429s each caused;
* ``faults``: a fifth of the requests fail (5xx, resets, cut-off streams); the rows that ended ok.

promptmill runs as the command (``python -m batch run --engine ray``, its own local Ray);
Ray Data LLM in this process on a local Ray of the same size, started after it. Every run is
bounded by ``--run-timeout``; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.simulator import SimConfig, SimServer

WORKERS = 4
CONCURRENCY = 200  # promptmill's, split across the workers
LATENCY_MS = 200
MODEL = "simulator-small"


def _rows(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"id": [f"r{i:06d}" for i in range(n)],
                             "prompt": [f"Tell me fact number {i} about the sea" for i in range(n)]}), path)
    return path


def _promptmill(sim: SimServer, inp: Path, out: Path, timeout: float, rpm: float | None) -> dict[str, Any]:
    job = out.with_suffix(".toml")
    job.write_text(
        f'[input]\npath = "{inp}"\n[output]\npath = "{out}"\n'
        f'[api]\nbase_url = "{sim.base_url}"\nread_timeout_s = 5\n'
        f'[request]\nmodel = "{MODEL}"\nmax_tokens = 16\n'
        f"[limits]\nconcurrency = {CONCURRENCY}\n" + (f"rpm = {rpm}\n" if rpm else "")
        + "[retry]\nmax_attempts = 10\ninitial_wait_s = 0.05\nmax_wait_s = 1\n"
        f'[engine]\nkind = "ray"\nworkers = {WORKERS}\ncpus_per_worker = 0.5\n'
    )
    sim.reset_stats()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--no-progress", "-q"],
                          capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - started
    ok, sending = 0, None
    if out.exists():
        table = pq.read_table(out, columns=["status", "finished_at"])
        ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
        times = sorted(t.timestamp() for t in table.column("finished_at").to_pylist())
        sending = times[-1] - times[0] if len(times) > 1 else None  # first answer to last: Ray's start-up left out
    note = f"exit {done.returncode}" + (f": {done.stderr.strip().splitlines()[-1]}" if done.returncode else "")
    if rpm and sending:
        note += f"; {(ok - 1) / sending / (rpm / 60):.2f} of the limit"
    return {"wall": wall, "ok": ok, "429": sim.stats["by_status"].get("429", 0), "note": note, "sending": sending}


def _ray_data_llm(sim: SimServer, inp: Path, rows: int, qps: int | None) -> dict[str, Any]:
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(url=f"{sim.base_url}/chat/completions", concurrency=WORKERS,
                                        batch_size=64, qps=qps)
    processor = build_processor(
        config,
        preprocess=lambda row: {"payload": {"model": MODEL, "max_tokens": 16,
                                            "messages": [{"role": "user", "content": row["prompt"]}]}},
        postprocess=lambda row: {"id": row["id"], "ok": "choices" in row["http_response"]},
    )
    sim.reset_stats()
    started = time.perf_counter()
    ok, note = 0, "finished"
    try:
        result = processor(ray.data.read_parquet(str(inp))).take_all()
        ok = sum(1 for r in result if r["ok"])
    except Exception as exc:  # what it does with a failed row: the whole dataset fails
        note = f"aborted: {type(exc).__name__}"
    wall = time.perf_counter() - started
    return {"wall": wall, "ok": ok, "429": sim.stats["by_status"].get("429", 0), "note": note, "sending": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="600 rows a scenario")
    parser.add_argument("--rpm", type=float, default=3000.0, help="the server's limit in the limit scenario")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument("--scenarios", default="latency,limit,faults", help="which to run, comma-separated")
    parser.add_argument("--no-ray-data-llm", action="store_true", help="promptmill alone")
    args = parser.parse_args()
    rows = 600 if args.quick else args.rows
    scenarios = {
        "latency": ({"latency_ms": LATENCY_MS}, None, None),
        "limit": ({"rpm": int(args.rpm / 6), "window_s": 10.0}, args.rpm, max(1, int(args.rpm / 60 / WORKERS))),
        "faults": ({"fault_rate": 0.2, "hang_s": 1.0}, None, None),
    }
    results: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp, SimServer(SimConfig()) as sim:
        inp = _rows(Path(tmp) / "in.parquet", rows)
        for name, (settings, rpm, qps) in scenarios.items():
            if name not in args.scenarios.split(","):
                continue
            sim.configure(**{**{k: getattr(SimConfig(), k) for k in ("latency_ms", "rpm", "window_s", "fault_rate")},
                             **settings})
            results.append((name, "promptmill", _promptmill(sim, inp, Path(tmp) / f"{name}.parquet",
                                                              args.run_timeout, rpm)))
            if args.no_ray_data_llm:
                continue
            import ray

            ray.init(num_cpus=WORKERS + 2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                results.append((name, "ray.data.llm", _ray_data_llm(sim, inp, rows, qps)))
            finally:
                ray.shutdown()
    ideal = rows * LATENCY_MS / 1000 / CONCURRENCY
    print(f"{rows:,} rows a scenario; {WORKERS} workers; promptmill concurrency {CONCURRENCY}; "
          f"ideal at {LATENCY_MS} ms: {ideal:.1f} s")
    print(f"{'scenario':<9} {'runner':<13} {'wall s':>7} {'rows/s':>7} {'ok':>6} {'429s':>5}  note")
    for name, runner, r in results:
        extra = f"wall/ideal {r['wall'] / ideal:.1f}; " if name == "latency" else ""
        if name == "latency" and r["sending"]:
            extra += f"sending {r['sending']:.1f} s ({rows / r['sending']:.0f} rows/s); "
        print(f"{name:<9} {runner:<13} {r['wall']:7.1f} {rows / r['wall']:7.1f} {r['ok']:6,} {r['429']:5,}  "
              f"{extra}{r['note']}")
    print(json.dumps({f"{n}/{rn}": r for n, rn, r in results}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
