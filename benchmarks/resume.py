"""Kill and rerun: what a SIGKILL costs, and how long a resume takes to start.

    python benchmarks/resume.py                      # 5 kills of a 3,000-row job, then a million-row resume
    python benchmarks/resume.py --kills 10 --rows 5000 --index-rows 0

Part 1 runs ``python -m batch run`` as a subprocess against the simulator (on
127.0.0.1, with latency), SIGKILLs it at random moments ``--kills`` times and
reruns it until it finishes, then prints rows lost, rows duplicated, requests
sent beyond the row count (and the bound: per kill, concurrency + flush rows),
and the time from starting each run to its first request.

Part 2 writes a ``--index-rows`` output synthetically (whole parts, through the
writer, as a killed run leaves them) with the last 10 rows not done, and times
what a rerun does before its first request: reading the resume index from the
parts and from the assembled output, the feeder skipping every finished row,
and the whole CLI from start to its first request (against a fresh run's).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batch import store as out  # noqa: E402  (the package of this checkout, not an installed one)
from batch.outputs import job_identity  # noqa: E402
from batch.prompts import RequestBuilder  # noqa: E402
from batch.simulator import SimConfig, SimServer  # noqa: E402
from batch.sources import open_source  # noqa: E402
from batch.spec_load import load_job  # noqa: E402

UNDONE = 10  # rows of the million-row job left for the rerun


def write_job(path: Path, base_url: str, inp: Path, outp: Path, args: argparse.Namespace) -> Path:
    path.write_text(f"""\
[job]
name = "resume-bench"

[input]
path = "{inp}"

[output]
path = "{outp}"
flush_rows = {args.flush_rows}
flush_s = {args.flush_s}

[api]
base_url = "{base_url}"

[request]
model = "simulator-small"
max_tokens = 32

[limits]
concurrency = {args.concurrency}
""")
    return path


def start(job: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(job), "--no-progress", "-q", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )


def until_first_request(sim: SimServer, proc: subprocess.Popen[bytes], before: int, timeout: float) -> float | None:
    """Seconds from now until the simulator sees a new request (None if the run ended or timed out)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if sim.stats["requests"] > before:
            return time.perf_counter() - t0
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    return None


def kill_and_rerun(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    inp = tmp / "in.jsonl"
    inp.write_bytes(b"".join(
        orjson.dumps({"id": f"r{i:07d}", "prompt": f"Tell me fact number {i} about the sea"}) + b"\n"
        for i in range(args.rows)
    ))
    outp = tmp / "out.parquet"
    with SimServer(SimConfig(latency_ms=args.latency_ms)) as sim:
        job = write_job(tmp / "job.toml", sim.base_url, inp, outp, args)
        kills, runs = 0, 0
        firsts: list[tuple[int, float]] = []  # (run, seconds from its start to its first request)
        deadline = time.monotonic() + args.timeout
        while True:
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up after {args.timeout:.0f} s")
            runs += 1
            before = sim.stats["requests"]
            # a random moment of the run: at start-up, mid-flush, anywhere
            kill_at = rng.uniform(0, args.max_delay) if kills < args.kills else None
            t0 = time.perf_counter()
            proc = start(job)
            first = None
            while proc.poll() is None and time.monotonic() < deadline:
                elapsed = time.perf_counter() - t0
                if first is None and sim.stats["requests"] > before:
                    first = elapsed
                if kill_at is not None and elapsed >= kill_at:
                    break
                time.sleep(0.002)
            if first is not None:
                firsts.append((runs, first))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                if kill_at is None:
                    raise SystemExit(f"gave up after {args.timeout:.0f} s")
                kills += 1
                continue
            _, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                raise SystemExit(f"the final run failed ({proc.returncode}): {err.decode()[-2000:]}")
            break
        requests = sim.stats["requests"]
    table = pq.read_table(outp, columns=["id", "status"])
    ids = table["id"].to_pylist()
    want = {f"r{i:07d}" for i in range(args.rows)}
    return {
        "runs": runs,
        "kills": kills,
        "lost": len(want - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "not_ok": sum(1 for s in table["status"].to_pylist() if s != "ok"),
        "beyond": requests - args.rows,
        "bound": kills * (args.concurrency + args.flush_rows),
        "first_fresh": next((f for run, f in firsts if run == 1), None),
        "first_resume": statistics.median(resumed) if (resumed := [f for run, f in firsts if run > 1]) else None,
    }


def million(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    n = args.index_rows
    inp = tmp / "big.parquet"
    pq.write_table(pa.table({
        "id": [f"r{i:07d}" for i in range(n)],
        "prompt": [f"Tell me fact number {i} about the sea" for i in range(n)],
    }), inp)
    outp = tmp / "big-out.parquet"
    with SimServer(SimConfig()) as sim:
        job = write_job(tmp / "big.toml", sim.base_url, inp, outp, args)
        spec = load_job(job)
        reader = open_source(spec.input)
        builder = RequestBuilder(spec)
        ids: list[str] = []
        fps: list[str] = []
        for batch in reader.batches():
            for row in batch:
                request = builder.build(row)
                ids.append(request.id)
                fps.append(request.fingerprint)
        done = n - UNDONE  # the last rows are not done: the rerun skips everything before them
        schema = out.output_schema(reader.passthrough_schema)
        columns = {f.name: pa.nulls(done, f.type) for f in schema}
        columns.update(id=pa.array(ids[:done]), request_fingerprint=pa.array(fps[:done]),
                       status=pa.array(["ok"] * done), model=pa.array([spec.request.model] * done))
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        out.write_job_identity(outp, job_identity(spec))
        writer = out.PartWriter(outp, schema, run=1)
        for start_row in range(0, done, 100_000):
            writer.write(table.slice(start_row, 100_000))

        t = time.perf_counter()
        index = out.load_index(outp)
        index_parts = time.perf_counter() - t
        t = time.perf_counter()
        skipped = 0
        for batch in reader.batches():
            for row in batch:
                if builder.build_unless_done(row, index) is None:
                    skipped += 1
        skip = time.perf_counter() - t
        assert skipped == done, (skipped, done)

        # the whole CLI: a fresh run of the same input (killed at its first request) ...
        fresh_job = write_job(tmp / "fresh.toml", sim.base_url, inp, tmp / "fresh-out.parquet", args)
        proc = start(fresh_job)
        fresh = until_first_request(sim, proc, sim.stats["requests"], timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        # ... and the rerun over the million finished rows, to its end
        before = sim.stats["requests"]
        proc = start(job)
        resume = until_first_request(sim, proc, before, timeout=300)
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"the million-row rerun failed ({proc.returncode}): {err.decode()[-2000:]}")
        sent = sim.stats["requests"] - before
        t = time.perf_counter()
        index = out.load_index(outp)
        index_output = time.perf_counter() - t
        assert len(index) == n, len(index)
    return {"rows": n, "index_parts": index_parts, "index_output": index_output, "skip": skip,
            "fresh": fresh or float("nan"), "resume": resume or float("nan"), "sent": sent}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000, help="rows of the killed job (default 3000)")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs before the run that finishes (default 5)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=20.0, help="simulator latency (default 20)")
    p.add_argument("--flush-rows", type=int, default=100, help="output.flush_rows (default 100)")
    p.add_argument("--flush-s", type=float, default=1.0, help="output.flush_s (default 1.0)")
    p.add_argument("--max-delay", type=float, default=4.0, help="kill within this many seconds of a start (default 4)")
    p.add_argument("--index-rows", type=int, default=1_000_000, help="rows of the resume start-up test (0: skip it)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="give up the kill loop after this long (default 300 s)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="promptmill-resume-") as d:
        tmp = Path(d)
        r = kill_and_rerun(args, tmp)
        print(f"kill and rerun: {args.rows:,} rows, concurrency {args.concurrency}, latency {args.latency_ms:g} ms, "
              f"flush every {args.flush_rows} rows or {args.flush_s:g} s")
        print(f"  runs                          {r['runs']} ({r['kills']} killed with SIGKILL)")
        print(f"  rows lost                     {r['lost']}")
        print(f"  rows duplicated               {r['duplicated']}")
        print(f"  rows not ok                   {r['not_ok']}")
        print(f"  {'requests beyond ' + format(args.rows, ','):<30}{r['beyond']} "
              f"(bound: {r['bound']} = kills x (concurrency + flush rows))")
        print(f"  start to first request        fresh {_s(r['first_fresh'])}, resume (median) {_s(r['first_resume'])}")
        if args.index_rows:
            m = million(args, tmp)
            print(f"resume start-up: {m['rows']:,} rows, {UNDONE} not done (at the end of the input)")
            print(f"  load_index from 10 parts      {_s(m['index_parts'])}")
            print(f"  load_index from the output    {_s(m['index_output'])}")
            print(f"  feeder skipping finished rows {_s(m['skip'])}")
            print(f"  CLI start to first request    fresh {_s(m['fresh'])}, resume {_s(m['resume'])}")
            print(f"  requests sent by the rerun    {m['sent']}")


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    main()
