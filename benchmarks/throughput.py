"""End-to-end throughput of promptmill against the simulator, beside a naive baseline.

Every run is its own process: the simulator (``python -m batch.simulator``)
pinned to core 0, and the client under test pinned to core 1 (with ``taskset``
where it exists). The client under test is either

* ``promptmill``: ``python -m batch run --input ... --concurrency N --no-progress -q``, or
* ``baseline``: what users hand-write, the official ``openai`` SDK's ``AsyncOpenAI``
  with an ``asyncio.Semaphore``, reading the same Parquet input and writing a
  Parquet file at the end (see :func:`_baseline`), or
* ``raw client`` (scenarios with a latency): the same requests from raw keep-alive
  sockets that parse nothing and write nothing (:func:`_raw_scenario`). Its
  wall time includes its own Python start and this script's imports (about
  0.2 s); its note gives the requests alone, from the first sent to the last
  answer: the floor the simulator and the machine set.

The package's bytecode is compiled before the runs (see :func:`_compile_bytecode`).
For each run the table gives the wall time from process start to exit, rows/s,
CPU seconds (user + sys, from ``os.wait4``) per 1,000 rows, the peak RSS of
the process (``ru_maxrss``), wall / ideal where latency sets an ideal
(rows x latency / concurrency), and promptmill's rows/s over the baseline's.
Before the scenarios, the simulator's own capacity is measured with a trivial
client (raw keep-alive sockets, many connections, pinned like the others); a
scenario whose rate came within 20% of it is marked, as the server may have
been the limit there.

    python benchmarks/throughput.py --quick                  # scaled-down sizes, under a minute
    python benchmarks/throughput.py --scenarios burst,latency
    python benchmarks/throughput.py --rows large=50000 --no-baseline

Inputs (Parquet: ``id``, ``prompt``) are generated once into a temporary
folder, removed at the end. Every run is bounded in time (``--run-timeout``)
and every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-model"
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "jobs" / "schemas" / "qa.json"
MAX_TOKENS = 256  # what promptmill sends by default; the baseline sends the same
SIM_CORE, CLIENT_CORE = "0", "1"
NEAR_CAPACITY = 0.8  # a run at or above this share of the simulator's capacity is marked


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    rows: int
    quick_rows: int
    latency_ms: float
    concurrency: int
    baseline: bool = True  # also run the baseline (it keeps every result in memory)
    goals: tuple[tuple[str, str, float], ...] = ()  # (metric, "min"/"max", bound) for promptmill
    sweep: tuple[int, int] | None = None  # (variants, samples): each input row is that many output rows

    @property
    def per_row(self) -> int:
        return 1 if self.sweep is None else self.sweep[0] * self.sweep[1]

    def ideal_s(self, rows: int) -> float | None:
        if self.latency_ms <= 0:
            return None
        return rows * self.latency_ms / 1000.0 / self.concurrency


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("burst", "0 ms, c256", 20_000, 2_000, 0, 256,
                 goals=(("rows_s", "min", 1200), ("cpu_per_1k", "max", 0.4))),
        # burst's rows x 4 variants (temperatures) x 2 samples; goal: rows/s within 10% of burst's
        Scenario("sweep", "0 ms, c256, 4x2", 20_000, 2_000, 0, 256, baseline=False, sweep=(4, 2)),
        Scenario("large", "0 ms, c256", 200_000, 4_000, 0, 256,
                 goals=(("rows_s", "min", 1900), ("rss_mb", "max", 200))),
        Scenario("million", "0 ms, c256", 1_000_000, 5_000, 0, 256, baseline=False,
                 goals=(("rss_mb", "max", 200),)),
        Scenario("latency", "200 ms, c200", 5_000, 1_000, 200, 200,
                 goals=(("wall_ideal", "max", 1.15),)),
        Scenario("wide", "1 s, c2000", 20_000, 2_000, 1000, 2000,
                 goals=(("wall_ideal", "max", 1.2),)),
    )
}


@dataclass
class RunResult:
    scenario: str
    runner: str
    rows: int
    ok: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_mb: float = 0.0
    ideal_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rows_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.rows * 1000 if self.rows else 0.0

    @property
    def wall_ideal(self) -> float | None:
        return self.wall_s / self.ideal_s if self.ideal_s else None


# --- processes ------------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _pinned(core: str, argv: list[str], pin: bool) -> list[str]:
    if pin and shutil.which("taskset"):
        return ["taskset", "-c", core, *argv]
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # a session of its own: Ctrl-C reaches only this script, which stops the child itself
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(), cwd=REPO, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.returncode is None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def _stop_all() -> None:
    for proc in list(_CHILDREN):
        with contextlib.suppress(Exception):
            _stop(proc)


@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float
    rss_mb: float


def _measure(argv: list[str], log: Path, timeout_s: float) -> Measured:
    """Run one client process to its end; wall time, CPU and peak RSS from ``os.wait4``."""
    start = time.perf_counter()
    proc = _spawn(argv, log)
    done: dict[str, Any] = {}

    def reap() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        done["end"] = time.perf_counter()
        done["status"] = status
        done["usage"] = usage

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    if waiter.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        waiter.join(10)
        _CHILDREN.remove(proc)
        proc.returncode = -9
        raise TimeoutError(f"still running after {timeout_s:.0f} s (see {log})")
    proc.returncode = os.waitstatus_to_exitcode(done["status"])
    _CHILDREN.remove(proc)
    usage = done["usage"]
    return Measured(
        returncode=proc.returncode,
        wall_s=done["end"] - start,
        cpu_s=usage.ru_utime + usage.ru_stime,
        rss_mb=usage.ru_maxrss / 1024.0,  # KiB on Linux
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Simulator:
    """``python -m batch.simulator`` in its own process, pinned to its own core."""

    def __init__(self, latency_ms: float, workdir: Path, pin: bool) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        argv = [sys.executable, "-m", "batch.simulator", "--host", "127.0.0.1",
                "--port", str(self.port), "--latency-ms", str(latency_ms)]
        self.proc = _spawn(_pinned(SIM_CORE, argv, pin), workdir / f"sim-{self.port}.log")
        self._wait_ready(15.0)

    def _admin(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/_sim/{path}", method=method,
                                     data=b"{}" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the simulator exited with {self.proc.returncode}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self._admin("GET", "stats")
                return
            time.sleep(0.05)
        raise TimeoutError("the simulator did not start")

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def reset(self) -> None:
        self._admin("POST", "reset")

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- inputs and outputs -------------------------------------------------------------------

_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray"]


def make_input(folder: Path, rows: int) -> Path:
    """A Parquet input of ``rows`` rows (``id``, ``prompt`` of about 20 words), made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / f"input-{rows}.parquet"
    if path.exists():
        return path
    ids, prompts = [], []
    writer = None
    try:
        for i in range(rows):
            ids.append(f"row-{i:07d}")
            words = " ".join(_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(16))
            prompts.append(f"Summarise item {i} in one line: {words}.")
            if len(ids) == 100_000 or i == rows - 1:
                table = pa.table({"id": ids, "prompt": prompts})
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                ids, prompts = [], []
    finally:
        if writer is not None:
            writer.close()
    return path


def _in_child(*args: str) -> str:
    """Run one of this file's child modes and return what it printed.

    Building inputs and reading outputs with Arrow in this process would grow it,
    and a process this one starts reports at least this one's peak RSS (Linux keeps
    the peak of the memory a process had before its exec), so every measured peak
    would be inflated to this process's.
    """
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def count_ok(path: Path) -> int:
    """Rows with status "ok" in an output file (0 when it is missing or unreadable)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        status = pq.read_table(path, columns=["status"])["status"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(pc.sum(pc.equal(status, "ok")).as_py() or 0)


# --- the naive baseline (runs in its own process) ----------------------------------------------


async def _baseline(input_path: str, output_path: str, base_url: str, model: str, concurrency: int) -> None:
    """What users hand-write: AsyncOpenAI, a semaphore, gather, one Parquet file at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from openai import AsyncOpenAI

    table = pq.read_table(input_path, columns=["id", "prompt"])
    ids = table["id"].to_pylist()
    prompts = table["prompt"].to_pylist()
    client = AsyncOpenAI(base_url=base_url, api_key="not-a-key")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> dict[str, Any]:
        async with semaphore:
            try:
                resp = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                )
            except Exception as exc:  # a hand-written script keeps going and records the error
                return {"status": "failed", "text": None, "prompt_tokens": None,
                        "completion_tokens": None, "error": repr(exc)}
            usage = resp.usage
            return {"status": "ok", "text": resp.choices[0].message.content,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None, "error": None}

    results = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    columns: dict[str, list[Any]] = {"id": ids}
    for key in ("status", "text", "prompt_tokens", "completion_tokens", "error"):
        columns[key] = [r[key] for r in results]
    pq.write_table(pa.table(columns), output_path)


# --- the simulator's capacity (runs in its own process) ---------------------------------------


async def _capacity(port: int, connections: int, seconds: float, warmup_s: float, max_requests: int) -> dict[str, Any]:
    """Requests/s the simulator answers to a client that costs next to nothing per request.

    Raw HTTP/1.1 on keep-alive sockets, one request in flight per connection,
    requests built once; only requests completed after the warm-up count.
    """
    bodies = _raw_bodies()
    start = time.perf_counter()
    count_from = start + warmup_s
    deadline = count_from + seconds
    counted = 0
    total = 0
    errors = 0

    async def connection(k: int) -> None:
        nonlocal counted, total, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            i = k
            while total < max_requests:
                writer.write(bodies[i % len(bodies)])
                i += 1
                if not await _answer_ok(reader):
                    errors += 1
                now = time.perf_counter()
                total += 1
                if now >= deadline:
                    return
                if now >= count_from:
                    counted += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(k) for k in range(connections)))
    elapsed = min(time.perf_counter(), deadline) - count_from
    return {"rps": counted / elapsed if elapsed > 0 else 0.0, "requests": total, "errors": errors,
            "connections": connections, "seconds": round(elapsed, 2)}


async def _answer_ok(reader: asyncio.StreamReader) -> bool:
    """Read one answer (head and Content-Length body); whether it was a 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at < 0:
        raise RuntimeError("the simulator answered without a Content-Length")
    await reader.readexactly(int(lower[at + 15 : lower.find(b"\r\n", at)]))
    return head.startswith(b"HTTP/1.1 200")


def _raw_bodies() -> list[bytes]:
    bodies = []
    for i in range(64):
        body = json.dumps({"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [
            {"role": "user", "content": f"Summarise item {i} in one line: " + " ".join(_WORDS[:16])}]}).encode()
        bodies.append(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
    return bodies


async def _raw_scenario(port: int, connections: int, rows: int) -> int:
    """The scenario's requests from a client that costs next to nothing: the floor the simulator sets.

    ``connections`` keep-alive sockets, each sending its share of ``rows`` one after
    another; nothing is parsed beyond the status line and Content-Length, nothing
    written. Returns the number of 200 answers.
    """
    bodies = _raw_bodies()
    ok = 0

    async def connection(k: int, count: int) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(count):
                writer.write(bodies[(k + i) % len(bodies)])
                answered = await _answer_ok(reader)  # not ``ok += await ...``: that reads ok before waiting
                ok += answered
        finally:
            writer.close()

    share, extra = divmod(rows, connections)
    await asyncio.gather(*(connection(k, share + (k < extra)) for k in range(connections)))
    return ok


def measure_capacity(sim: Simulator, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "capacity.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "_capacity", "--port", str(sim.port),
            "--connections", str(args.capacity_connections), "--seconds", str(args.capacity_s),
            "--json", str(out)]
    m = _measure(_pinned(CLIENT_CORE, argv, args.pin), workdir / "capacity.log", args.capacity_s + 60)
    if m.returncode != 0:
        raise RuntimeError(f"the capacity client failed (see {workdir / 'capacity.log'})")
    data: dict[str, Any] = json.loads(out.read_text())
    sim.reset()
    return data


# --- one scenario ------------------------------------------------------------------------------


def _timeout(args: argparse.Namespace, rows: int, ideal: float | None) -> float:
    if args.run_timeout:
        return float(args.run_timeout)
    # generous: 25 rows/s at worst, or thirty times the ideal, plus start-up
    return 120.0 + max(rows / 25.0, 30 * (ideal or 0.0))


def run_client(runner: str, scenario: Scenario, rows: int, input_path: Path, sim: Simulator,
               args: argparse.Namespace, workdir: Path) -> RunResult:
    output = workdir / f"out-{scenario.name}-{runner}.parquet"
    rows_in, rows = rows, rows * scenario.per_row
    for leftover in (output, output.with_name(output.name + ".summary.json")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(output.with_name(output.name + ".parts"), ignore_errors=True)
    if runner == "promptmill" and scenario.sweep is not None:
        argv = [sys.executable, "-m", "batch", "run", str(_sweep_job(scenario, input_path, output, sim, workdir)),
                "--concurrency", str(scenario.concurrency), "--no-progress", "-q"]
    elif runner.startswith("promptmill"):
        job: list[str] = []
        if runner == "promptmill+schema":
            # structured output: the schema sent, every answer (valid JSON from the simulator) checked and typed
            job_file = workdir / "schema-job.toml"
            job_file.write_text(f'[output]\npath = "{output}"\nschema_file = "{SCHEMA_FILE}"\n')
            job = [str(job_file)]
        argv = [sys.executable, "-m", "batch", "run", *job, "--input", str(input_path), "--output", str(output),
                "--base-url", sim.base_url, "--model", MODEL, "--concurrency", str(scenario.concurrency),
                "--no-progress", "-q"]
    elif runner == "raw client":
        argv = [sys.executable, str(Path(__file__).resolve()), "_raw", "--port", str(sim.port),
                "--connections", str(scenario.concurrency), "--rows", str(rows_in)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "_baseline", "--input", str(input_path),
                "--output", str(output), "--base-url", sim.base_url, "--model", MODEL,
                "--concurrency", str(scenario.concurrency)]
    ideal = scenario.ideal_s(rows)
    result = RunResult(scenario.name, runner, rows, ideal_s=ideal)
    log = workdir / f"{scenario.name}-{runner}.log"
    sim.reset()
    try:
        m = _measure(_pinned(CLIENT_CORE, argv, args.pin), log, _timeout(args, rows, ideal))
    except TimeoutError as exc:
        result.error = str(exc)
        return result
    result.wall_s, result.cpu_s, result.rss_mb = m.wall_s, m.cpu_s, m.rss_mb
    if runner == "raw client":
        printed = log.read_text(errors="replace").split()
        result.ok = int(printed[-1]) if printed and printed[-1].isdigit() else 0
        if len(printed) >= 2 and ideal:
            # its wall time includes Python's start and this script's imports; the requests alone:
            loop_s = float(printed[-2])
            result.notes.append(f"requests alone {loop_s:.2f} s = {loop_s / ideal:.2f} x ideal")
    else:
        result.ok = int(_in_child("_count_ok", "--input", str(output)))
    if m.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        result.error = f"exit {m.returncode}: {tail[0][:120]}"
    if result.ok != rows:
        result.notes.append(f"{rows - result.ok:,} rows not ok")
    stats = sim.stats()
    # the raw client sends 64 bodies over and over; a sweep asks each prompt once per variant and sample
    if stats.get("repeats") and runner != "raw client" and scenario.sweep is None:
        result.notes.append(f"{stats['repeats']:,} repeated requests")
    for leftover in (output, output.with_name(output.name + ".summary.json")):
        leftover.unlink(missing_ok=True)
    return result


def _sweep_job(scenario: Scenario, input_path: Path, output: Path, sim: Simulator, workdir: Path) -> Path:
    """A sweep over the input: ``variants`` temperatures x ``samples`` samples, on the simulator."""
    assert scenario.sweep is not None
    variants, samples = scenario.sweep
    temperatures = ", ".join(f"{i / variants:g}" for i in range(variants))
    job = workdir / f"{scenario.name}.toml"
    job.write_text(f'[input]\npath = "{input_path}"\n[output]\npath = "{output}"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\n[request]\nmodel = "{MODEL}"\n'
                   f"[sweep]\nsamples = {samples}\n[sweep.grid]\ntemperature = [{temperatures}]\n")
    return job


def _against_burst(results: list[RunResult]) -> None:
    """The sweep's goal: its rows/s within 10% of the plain burst's, noted beside it."""
    burst = next((r for r in results if r.scenario == "burst" and r.runner == "promptmill" and not r.error), None)
    for r in results:
        if burst is not None and r.scenario == "sweep" and r.runner == "promptmill" and burst.rows_s:
            ratio = r.rows_s / burst.rows_s
            r.notes.append(f"{ratio:.2f}x burst's rows/s: {'ok' if ratio >= 0.9 else 'MISSED'} (goal: within 10%)")


# --- the table ---------------------------------------------------------------------------------


def _goal_text(s: Scenario, r: RunResult, capacity_rps: float | None) -> str:
    if s.goals and r.rows != s.rows:
        return "goals are for full size"  # a 1 s ideal is mostly start-up, not the client's pace
    shown = []
    for metric, kind, bound in s.goals:
        if metric == "rows_s" and capacity_rps and s.name == "large":
            # the goal: the bound, or within 10% of the simulator where that is lower
            bound = min(bound, 0.9 * capacity_rps)
        value = getattr(r, metric)
        if value is None:
            continue
        met = value >= bound if kind == "min" else value <= bound
        sign = "≥" if kind == "min" else "≤"
        name = {"rows_s": "rows/s", "cpu_per_1k": "CPU/1k", "rss_mb": "RSS", "wall_ideal": "w/ideal"}[metric]
        shown.append(f"{name}{sign}{bound:g} {'ok' if met else 'MISSED'}")
    return "; ".join(shown)


def render(results: list[RunResult], capacity: dict[str, Any] | None, args: argparse.Namespace,
           sizes: dict[str, int]) -> str:
    cap = capacity["rps"] if capacity else None
    header = ["scenario", "runner", "rows", "ok", "wall s", "rows/s", "CPU s/1k", "peak RSS MB",
              "wall/ideal", "vs baseline", "goal (promptmill)", "note"]
    lines: list[list[str]] = []
    baseline_rate = {r.scenario: r.rows_s for r in results if r.runner == "baseline" and not r.error}
    for r in results:
        s = SCENARIOS[r.scenario]
        notes = list(r.notes)
        if r.error:
            notes.insert(0, r.error)
        if cap and not r.error and r.rows_s >= NEAR_CAPACITY * cap:
            notes.append(f"within 20% of the simulator's capacity ({cap:,.0f}/s)")
        ratio = ""
        if r.runner == "promptmill" and not r.error and baseline_rate.get(r.scenario):
            ratio = f"{r.rows_s / baseline_rate[r.scenario]:.2f}x"
        failed = r.error is not None and r.wall_s == 0
        lines.append([
            f"{s.name} ({sizes[s.name]:,} rows, {s.label})" if r.runner == "promptmill" or not any(
                x.scenario == r.scenario and x.runner == "promptmill" for x in results) else "",
            r.runner,
            f"{r.rows:,}",
            f"{r.ok:,}",
            "-" if failed else f"{r.wall_s:.2f}",
            "-" if failed else f"{r.rows_s:,.0f}",
            "-" if failed else f"{r.cpu_per_1k:.3f}",
            "-" if failed else f"{r.rss_mb:,.0f}",
            "-" if r.wall_ideal is None or failed else f"{r.wall_ideal:.2f}",
            ratio,
            _goal_text(s, r, cap) if r.runner == "promptmill" and not failed else "",
            "; ".join(notes),
        ])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    numeric = {2, 3, 4, 5, 6, 7, 8, 9}

    def fmt(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    out = []
    pin = "simulator on core 0, client on core 1 (taskset)" if args.pin and shutil.which("taskset") else "not pinned"
    out.append(f"promptmill throughput — {os.cpu_count()} cores, {pin}{', quick sizes' if args.quick else ''}")
    out.append(versions())
    # other work on the machine skews wall times (CPU seconds much less): say how busy it was
    out.append(f"load average at start {args.load_start:.2f}, at end {os.getloadavg()[0]:.2f} (1 min)")
    if capacity:
        out.append(f"simulator capacity: {capacity['rps']:,.0f} requests/s (raw keep-alive client, "
                   f"{capacity['connections']} connections, {capacity['seconds']} s, {capacity['errors']} errors)")
    out.append(fmt(header))
    out.append(fmt(["-" * w for w in widths]))
    out.extend(fmt(row) for row in lines)
    return "\n".join(out)


def versions() -> str:
    names = ["promptmill", "httpx", "httpcore", "anyio", "uvloop", "orjson", "pyarrow", "tenacity",
             "uvicorn", "httptools", "openai"]
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name == "promptmill":
                sys.path.insert(0, str(REPO))
                from batch import __version__

                parts.append(f"promptmill {__version__} (source)")
    return ", ".join(parts)


# --- command line ------------------------------------------------------------------------------


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {name: (s.quick_rows if args.quick else s.rows) for name, s in SCENARIOS.items()}
    if args.scale != 1.0:
        sizes = {name: max(1, round(n * args.scale)) for name, n in sizes.items()}
    for item in args.rows or ():
        name, _, value = item.partition("=")
        if name not in SCENARIOS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--rows takes NAME=N with NAME one of {', '.join(SCENARIOS)}, not {item!r}")
        sizes[name] = int(value)
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: " + "; ".join(
                                    f"{s.name} = {s.rows:,} rows, {s.label} (quick {s.quick_rows:,})"
                                    for s in SCENARIOS.values()))
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names (default: all)")
    p.add_argument("--quick", action="store_true", help="scaled-down sizes: the whole run takes under a minute")
    p.add_argument("--rows", action="append", metavar="NAME=N", help="rows of one scenario (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every scenario's rows")
    p.add_argument("--no-baseline", action="store_true", help="skip the openai-SDK baseline")
    p.add_argument("--schema", action="store_true",
                   help="also run promptmill with a JSON schema (jobs/schemas/qa.json): answers checked and typed")
    p.add_argument("--no-raw", action="store_true",
                   help="skip the raw-socket client that shows the floor the simulator sets where latency sets an ideal")
    p.add_argument("--baseline-max-rows", type=int, default=200_000,
                   help="skip the baseline above this many rows (it keeps every result in memory)")
    p.add_argument("--capacity-s", type=float, default=3.0, help="seconds of the simulator capacity measurement (0: skip)")
    p.add_argument("--capacity-connections", type=int, default=256)
    p.add_argument("--run-timeout", type=float, default=0.0, help="seconds one run may take (default: by size)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (inputs, logs)")
    return p


def _sub_main(argv: list[str]) -> int:
    """The child modes: ``_baseline``, ``_capacity``, ``_make_input``, ``_count_ok`` (each its own process)."""
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["_baseline", "_capacity", "_make_input", "_count_ok", "_raw"])
    p.add_argument("--rows", type=int)
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--base-url")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--port", type=int)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.mode == "_make_input":
        print(make_input(Path(a.output), a.rows))
        return 0
    if a.mode == "_count_ok":
        print(count_ok(Path(a.input)))
        return 0
    if a.mode == "_raw":
        try:
            import uvloop

            run_raw = uvloop.run
        except ImportError:
            run_raw = asyncio.run
        started = time.perf_counter()
        ok = run_raw(_raw_scenario(a.port, a.connections, a.rows))
        print(f"{time.perf_counter() - started:.3f} {ok}")  # the requests alone, without our start-up
        return 0
    if a.mode == "_baseline":
        asyncio.run(_baseline(a.input, a.output, a.base_url, a.model, a.concurrency))
        return 0
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    data = run(_capacity(a.port, a.connections, a.seconds, 0.5, 2_000_000))
    Path(a.json).write_text(json.dumps(data))
    return 0


def _compile_bytecode() -> None:
    """Compile the package's bytecode first, as an installed package has it.

    pip compiles what it installs, and a checkout writes ``__pycache__`` on its first
    run; where PYTHONDONTWRITEBYTECODE is set (as on the machine these figures come
    from) every run would otherwise compile the whole package again, about 0.1 s of
    start-up that no installed copy pays. The libraries (openai included) were
    compiled by pip.
    """
    import compileall

    # force: compileall trusts a .pyc whose recorded mtime matches the source's
    # (whole seconds), while the importer also checks the size; a file rewritten
    # within the second of its last compile would be compiled again on every run
    compileall.compile_dir(str(REPO / "batch"), quiet=1, force=True)


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="promptmill-bench-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_baseline", "_capacity", "_make_input", "_count_ok", "_raw"):
        return _sub_main(argv)
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        print(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    sizes = _sizes(args)
    args.load_start = os.getloadavg()[0]
    _compile_bytecode()

    # SIGTERM as Ctrl-C, so the finally below stops every child either way
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: list[RunResult] = []
    capacity: dict[str, Any] | None = None
    try:
        with _workdir(args.keep) as workdir:
            if args.capacity_s > 0:
                with Simulator(0, workdir, args.pin) as sim:
                    capacity = measure_capacity(sim, args, workdir)
                    print(f"simulator capacity: {capacity['rps']:,.0f} requests/s", file=sys.stderr)
            for name in names:
                s = SCENARIOS[name]
                rows = sizes[name]
                input_path = Path(_in_child("_make_input", "--output", str(workdir), "--rows", str(rows)))
                # the schema's overhead is measured on plain jobs (a sweep scenario is its own comparison)
                runners = ["promptmill", "promptmill+schema"] if args.schema and s.sweep is None else ["promptmill"]
                if s.baseline and not args.no_baseline and rows <= args.baseline_max_rows:
                    runners.append("baseline")
                if s.latency_ms > 0 and not args.no_raw:
                    runners.append("raw client")
                with Simulator(s.latency_ms, workdir, args.pin) as sim:
                    for runner in runners:
                        r = run_client(runner, s, rows, input_path, sim, args, workdir)
                        plain = next((p for p in results if p.scenario == name and p.runner == "promptmill"), None)
                        if runner == "promptmill+schema" and plain and plain.rows_s and r.rows_s:
                            r.notes.append(f"{r.rows_s / plain.rows_s:.2f} x plain promptmill's rows/s")
                        results.append(r)
                        print(f"{name} {runner}: {r.rows_s:,.0f} rows/s, {r.wall_s:.2f} s"
                              + (f" ({r.error})" if r.error else ""), file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        _stop_all()
        if results:
            print(render(results, capacity, args, sizes))
        return 130
    finally:
        _stop_all()
    _against_burst(results)
    print(render(results, capacity, args, sizes))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
