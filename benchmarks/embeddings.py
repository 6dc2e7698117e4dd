"""Embeddings throughput: 20,000 inputs against the built-in simulator, one row a request vs 64.

    python benchmarks/embeddings.py [--rows 20000] [--batches 1 64] [--latency-ms 0] [--concurrency 32]

Each run is a whole job (read, batch, send, split usage, write Parquet) through
``batch.runner.run_job``; rows/s is rows over the job's wall time. The simulator
runs in this process's server thread, so on 2 cores it competes with the client.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batch.runner import RunOptions, run_job  # noqa: E402  (the package of this checkout, not an installed one)
from batch.simulator import SimConfig, SimServer  # noqa: E402
from batch.spec_load import load_job  # noqa: E402


def one_run(base_url: str, inp: Path, outp: Path, batch: int, concurrency: int) -> float:
    spec = load_job(None, {
        "input.path": str(inp), "output.path": str(outp), "api.base_url": base_url, "api.endpoint": "embeddings",
        "request.model": "embedder", "input.embed_batch": batch, "limits.concurrency": concurrency,
    })
    started = time.perf_counter()
    summary = anyio.run(run_job, spec, RunOptions(fresh=True, progress=False, handle_signals=False))
    wall = time.perf_counter() - started
    if summary.rows_failed:
        raise SystemExit(f"embed_batch={batch}: {summary.rows_failed} rows failed")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--dim", type=int, default=256, help="vector length the simulator answers with")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir, \
            SimServer(SimConfig(latency_ms=args.latency_ms, embedding_dim=args.dim)) as sim:
        tmp = Path(tmp_dir)
        inp = tmp / "in.jsonl"
        inp.write_bytes(b"".join(
            orjson.dumps({"id": f"r{i}", "prompt": f"support ticket {i}: the printer on floor {i % 7} jams"}) + b"\n"
            for i in range(args.rows)))
        print(f"{args.rows:,} inputs, dimension {args.dim}, concurrency {args.concurrency}, "
              f"simulator latency {args.latency_ms:g} ms")
        for batch in args.batches:
            requests_before = sim.stats["requests"]
            wall = one_run(sim.base_url, inp, tmp / f"out-{batch}.parquet", batch, args.concurrency)
            sent = sim.stats["requests"] - requests_before
            print(f"embed_batch={batch:<4d} {args.rows / wall:10,.0f} rows/s  ({wall:.2f} s, {sent:,} requests)")


if __name__ == "__main__":
    main()
