"""How close promptmill runs to a server's rate limit, and how many 429s it costs.

Starts the simulator on 127.0.0.1 with sliding-window request and token limits,
runs a whole job through the runner (in this process) once per case, and prints
a table:

1. ``client``:  the job is given the server's limits (--rpm/--tpm); the server sends headers.
2. ``headers``: the job is given no limits; the server sends x-ratelimit-* and Retry-After.
3. ``bare``:    the job is given no limits; the server answers bare 429s (Atoma style).

Both of the server's limits bind: its token limit is the requests limit times
the mean token cost of a row (prompt + max_tokens, what it counts at admission).
Rates are measured over the whole run, from the first request sent to the last
answer, as a share of what the limit allows in that time; so an unpaced start
that fills the first window at once can show above 1.0 on a short run. The
longest stall is the longest time with no successful answer, in windows.

    python benchmarks/rate_limits.py                      # about 3 minutes
    python benchmarks/rate_limits.py --window 5 --windows 4 --cases bare
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.prompts import RequestBuilder
from batch.runner import RunOptions, run_job
from batch.simulator import count_prompt_tokens
from batch.sources import open_source
from batch.spec import JobSpec
from batch.spec_load import load_job

CASES = {
    "client": ("1. client limits = server's", "openai", True, 0.97, 0.0),
    "headers": ("2. no limits, headers", "openai", False, 0.90, 0.02),
    "bare": ("3. no limits, bare 429s", "atoma", False, 0.85, 0.05),
}


class Simulator:
    """The simulator in its own process on 127.0.0.1 (in a thread it would share the GIL
    with the job and delay its timers), driven through its admin API."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        root = Path(__file__).resolve().parents[1]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "batch.simulator", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{self.url}/_sim/stats", timeout=1).raise_for_status()
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the simulator did not start")
            time.sleep(0.05)

    def configure(self, **changes: Any) -> None:
        httpx.post(f"{self.url}/_sim/config", json=changes, timeout=10).raise_for_status()

    def reset_stats(self) -> None:
        httpx.post(f"{self.url}/_sim/reset", timeout=10).raise_for_status()

    @property
    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_sim/stats", timeout=10).json()
        return stats

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the network and notes when each answer came and its status."""

    def __init__(self, limit: int) -> None:
        from batch.network import Transport

        self._inner = Transport(limit=limit)  # the stack a job uses
        self.first_sent: float | None = None
        self.answers: list[tuple[float, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.first_sent is None:
            self.first_sent = time.perf_counter()
        response = await self._inner.handle_async_request(request)
        self.answers.append((time.perf_counter(), response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Figures:
    case: str
    seconds: float
    requests: int
    ok: int
    rate_limited: int
    request_share: float
    token_share: float
    stall_windows: float
    target: float
    max_429: float

    @property
    def met(self) -> bool:
        share_429 = self.rate_limited / max(1, self.requests)
        stall_ok = self.stall_windows <= 1.0 or self.case != "bare"
        return min(self.request_share, self.token_share) >= self.target and share_429 <= self.max_429 and stall_ok


def write_rows(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ["tide", "reef", "kelp", "gull", "wave", "salt", "shell", "foam", "dune", "cove"]
    with path.open("wb") as f:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            f.write(orjson.dumps({"id": f"r{i:06d}", "prompt": f"Row {i}: {text}"}) + b"\n")


def row_costs(spec: JobSpec) -> list[int]:
    """What the simulator counts against its token limit for each row."""
    builder = RequestBuilder(spec)
    costs = []
    for batch in open_source(spec.input).batches():
        for row in batch:
            body = builder.build(row).body
            costs.append(count_prompt_tokens(body) + int(body["max_tokens"]))
    return costs


def run_case(name: str, sim: Simulator, args: argparse.Namespace, workdir: Path) -> Figures:
    label, style, client_limits, target, max_429 = CASES[name]
    rows = args.limit * args.windows
    inp = workdir / "in.jsonl"
    if not inp.exists():
        write_rows(inp, rows, args.seed)
    overrides: dict[str, Any] = {
        "input.path": str(inp),
        "output.path": str(workdir / f"{name}.parquet"),
        "api.base_url": sim.base_url,
        "request.model": "simulator-small",
        "request.max_tokens": args.max_tokens,
        "limits.concurrency": args.concurrency,
        "retry.max_attempts": 100,
        "retry.row_budget_s": 3600.0,
    }
    spec = load_job(None, overrides)
    costs = row_costs(spec)
    tpm = round(args.limit * statistics.fmean(costs))
    if client_limits:
        per_minute = 60.0 / args.window
        spec = load_job(None, {**overrides, "limits.rpm": args.limit * per_minute, "limits.tpm": tpm * per_minute})

    sim.configure(rpm=args.limit, tpm=tpm, window_s=args.window, limit_style=style, latency_ms=args.latency_ms)
    sim.reset_stats()
    recorder = Recorder(args.concurrency)
    opts = RunOptions(fresh=True, progress=False, handle_signals=False, transport=recorder)
    summary = anyio.run(run_job, spec, opts)
    stats = sim.stats

    assert recorder.first_sent is not None
    ok_times = [t for t, status in recorder.answers if status == 200]
    end = recorder.answers[-1][0]
    seconds = end - recorder.first_sent
    allowed_requests = args.limit * seconds / args.window
    allowed_tokens = tpm * seconds / args.window
    points = [recorder.first_sent, *ok_times]
    stall = max(b - a for a, b in itertools.pairwise(points))
    if summary.rows_ok != rows:
        print(f"warning: {label}: {summary.rows_ok} of {rows} rows ok", file=sys.stderr)
    return Figures(
        case=label,
        seconds=seconds,
        requests=stats["requests"],
        ok=len(ok_times),
        rate_limited=stats["rate_limited"],
        request_share=len(ok_times) / allowed_requests,
        token_share=sum(costs) / allowed_tokens,
        stall_windows=stall / args.window,
        target=target,
        max_429=max_429,
    )


def print_table(figures: list[Figures], args: argparse.Namespace) -> None:
    print(
        f"server: {args.limit} requests and the matching tokens per {args.window:g} s sliding window; "
        f"{args.limit * args.windows} rows, concurrency {args.concurrency}, latency {args.latency_ms:g} ms"
    )
    head = f"{'case':<30} {'time s':>7} {'req/limit':>9} {'tok/limit':>9} {'429s':>5} {'429 share':>9} " \
           f"{'longest stall':>14}  {'target':<28}"
    print(head)
    print("-" * len(head))
    for f in figures:
        target = f">={f.target:.2f}, 429s {'0' if f.max_429 == 0 else f'<{f.max_429:.0%}'}"
        if f.case.startswith("3"):
            target += ", stall <=1 window"
        print(
            f"{f.case:<30} {f.seconds:>7.1f} {f.request_share:>9.3f} {f.token_share:>9.3f} {f.rate_limited:>5} "
            f"{f.rate_limited / max(1, f.requests):>9.2%} {f.stall_windows:>9.2f} win  {target:<28} "
            f"{'met' if f.met else 'MISSED'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=10.0, help="the server's sliding window, seconds (default 10)")
    parser.add_argument("--windows", type=int, default=6,
                        help="rows = limit * windows, so a run at the limit lasts this many windows (default 6)")
    parser.add_argument("--limit", type=int, default=300, help="requests per window (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="the server's latency (default 100)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    if args.windows < 2 or args.limit < 10 or args.window <= 0 or args.concurrency < 1:
        parser.error("use --windows >= 2, --limit >= 10, --window > 0, --concurrency >= 1")

    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    figures = []
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:
        for name in cases:
            figures.append(run_case(name, sim, args, Path(tmp)))
            print(f"  done: {figures[-1].case} in {figures[-1].seconds:.1f} s", file=sys.stderr)
    print_table(figures, args)
    return 0 if all(f.met for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
