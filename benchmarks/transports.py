"""Client CPU per request and requests/s of ``Client.complete`` over each well-kept HTTP stack.

    python benchmarks/transports.py                 # the whole table (a few minutes)
    python benchmarks/transports.py --quick         # concurrency 256 only

The simulator runs as its own process pinned to CPU 0, the client in a process
pinned to CPU 1, so the client's CPU time (``time.process_time``) is its own.
Options: ``httpx`` (httpx's own pool), ``httpx-aiohttp`` (httpx_aiohttp.AiohttpTransport as
shipped), ``default`` (Client with no transport: promptmill's stack, batch.network.Transport,
httpx-aiohttp with aiohttp's limits and decoding), and ``aiohttp`` (bare aiohttp.ClientSession
posts with orjson, no Client: the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ("httpx", "httpx-aiohttp", "aiohttp", "default")


def _body(i: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"Say hello to row {i}"}], "max_tokens": 32}


def _transport(option: str, concurrency: int) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if option == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits)
    if option == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(limits=limits)
    return None


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    base = f"http://127.0.0.1:{args.port}/v1"
    n, c = args.requests, args.concurrency
    if args.option == "aiohttp":
        import aiohttp
        import orjson

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c))
        url = base + "/chat/completions"

        async def one(i: int) -> None:
            payload = {**_body(i), "stream": True} if args.stream else _body(i)
            async with session.post(url, data=orjson.dumps(payload),
                                    headers={"Content-Type": "application/json"}) as response:
                data = await response.read()
                assert response.status == 200, data

        close = session.close
    else:
        from batch.client import Client

        client = Client(base, endpoint="chat", stream=args.stream, api_key="sk-bench",
                        concurrency=c, transport=_transport(args.option, c))

        async def one(i: int) -> None:
            await client.complete(_body(i))

        close = client.aclose

    errors = [0]

    async def run(total: int) -> None:
        it = iter(range(total))

        async def worker() -> None:
            for i in it:
                try:
                    await one(i)
                except Exception:
                    errors[0] += 1

        await asyncio.gather(*(worker() for _ in range(min(c, total))))

    await run(c)  # warm up: open every connection
    rounds = []
    for _ in range(args.rounds):
        cpu0, t0 = time.process_time(), time.perf_counter()
        await run(n)
        rounds.append((time.process_time() - cpu0, time.perf_counter() - t0))
    await close()
    # The best round: on a shared machine the others measure the neighbours too.
    cpu = min(r[0] for r in rounds)
    wall = min(r[1] for r in rounds)
    return {"rps": n / wall, "cpu_us": cpu / n * 1e6, "wall": wall, "cpu": cpu, "errors": errors[0]}


def _child(args: argparse.Namespace) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {1})
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(_measure(args))
    else:
        result = asyncio.run(_measure(args))
    print(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_sim(latency_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "batch.simulator", "--port", str(port),
         "--latency-ms", str(latency_ms)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("simulator did not start")


def _run_child(port: int, option: str, loop: str, stream: bool, concurrency: int, requests: int,
               rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--port", str(port), "--option", option, "--loop", loop,
           "--concurrency", str(concurrency), "--requests", str(requests), "--rounds", str(rounds)]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int)
    parser.add_argument("--option", choices=OPTIONS, default="default")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated options to measure")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=0, help="requests measured (default: per scenario)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; the best is reported")
    parser.add_argument("--quick", action="store_true", help="concurrency 256 at zero latency only")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    scenarios = [(256, 0.0, args.requests or 5_000)]
    if not args.quick:
        scenarios.append((2000, 1000.0, args.requests or 8_000))
    print(f"{'conc':>5} {'lat ms':>6} {'option':<14} {'loop':<8} {'stream':<6} {'req/s':>8} {'CPU µs/req':>11}")
    for concurrency, latency, requests in scenarios:
        sim, port = _start_sim(latency)
        try:
            for option in args.options.split(","):
                for loop in ("asyncio", "uvloop"):
                    for stream in (False, True):
                        r = _run_child(port, option, loop, stream, concurrency, requests, args.rounds)
                        if "error" in r:
                            line = f"error: {r['error'][:60]}"
                        else:
                            line = f"{r['rps']:>8.0f} {r['cpu_us']:>11.0f}"
                            if r.get("errors"):
                                line += f"  ({r['errors']} failed)"
                        print(f"{concurrency:>5} {latency:>6.0f} {option:<14} {loop:<8} {'yes' if stream else 'no':<6} {line}",
                              flush=True)
        finally:
            sim.terminate()
            sim.wait()


if __name__ == "__main__":
    main()
