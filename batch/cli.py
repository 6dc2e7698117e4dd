"""The ``promptmill`` command: parse arguments, call one function, turn errors into one line.

Exit codes: ``batch.errors.EXIT_REASONS`` (0 every row ok; 1 finished with failed
rows beyond --max-failed-fraction; 2 bad job file, option, input or output,
nothing sent; 3 a fatal server answer, an outage or a wait past retry.outage_s;
65 the input changed while the job ran; 74 a disk error writing parts, output or
summary; 75 a transient stop; 130 / 143 SIGINT / SIGTERM; every stop keeps what was done).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from batch import _startup
from batch.options import OPTION_KEYS

if TYPE_CHECKING:
    from batch.simulator import SimServer
    from batch.spec import JobSpec

__all__ = ["entry", "main"]

log = logging.getLogger("batch")


class _RedactingFormatter(logging.Formatter):
    """Removes secrets from every formatted line, tracebacks included."""

    def __init__(self, fmt: str, secrets: Sequence[str]) -> None:
        super().__init__(fmt)
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def _setup_logging(debug: bool, quiet: bool, secrets: Sequence[str], log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.promptmill = True  # type: ignore[attr-defined]
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "promptmill: %(message)s"
    if log_format == "json":
        from batch.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter(secrets))
    else:
        handler.setFormatter(_RedactingFormatter(fmt, secrets))
    root = logging.getLogger()
    # replace our own handler of an earlier call; leave other handlers (an embedding app's) alone
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "promptmill", False)] + [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    # set both ways: an earlier call in this process (an Airflow worker) may have quietened them
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.NOTSET if debug else logging.WARNING)


def _redact_also(secret: str | None) -> None:
    if not secret or len(secret) < 4:
        return
    for handler in logging.getLogger().handlers:
        secrets = getattr(handler.formatter, "_secrets", None) if getattr(handler, "promptmill", False) else None
        if isinstance(secrets, list) and secret not in secrets:
            secrets.append(secret)


def _log_job(name: str) -> None:
    """Name the job in every JSON log line from now on."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "promptmill", False) and hasattr(handler.formatter, "job"):
            setattr(handler.formatter, "job", name)  # noqa: B010 (a JsonFormatter, not imported for a text log)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _date(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2024-06-30 (YYYY-MM-DD)") from None


def _add_run_parser(sub: Any, name: str = "run") -> None:
    p = sub.add_parser(name, **_RUN_HELP[name])
    p.add_argument("job", nargs="?", help="the job file (TOML), e.g. jobs/sample.toml")
    p.add_argument("--input", metavar="PATH", help="prompts: a .parquet or .jsonl file")
    p.add_argument("--output", metavar="PATH", help="results: a .parquet file ({date} or {ds}, and {job} are filled in), "
                   "or a .jsonl with --output-format openai_batch")
    p.add_argument("--base-url", metavar="URL", help="the API's base URL, e.g. https://api.atoma.network/v1, or 'simulator'")
    p.add_argument("--model", help="the model to ask")
    p.add_argument("--endpoint", choices=["chat", "completions", "embeddings"],
                   help="chat (/chat/completions), completions (/completions) or embeddings (/embeddings)")
    p.add_argument("--input-format", choices=["auto", "parquet", "jsonl", "openai_batch"],
                   help="the input's format (default auto: an OpenAI batch file is recognised by its first line)")
    p.add_argument("--output-format", choices=["parquet", "openai_batch"],
                   help="openai_batch: write OpenAI's batch output format to an --output ending in .jsonl "
                        "(the Parquet output is kept beside it)")
    p.add_argument("--error-file", metavar="PATH",
                   help="with --output-format openai_batch: failed lines go to this .jsonl, as OpenAI's error file")
    p.add_argument("--embed-batch", type=int, metavar="N", help="embeddings: rows sent in one request (default 64)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None, help="stream the answers (SSE)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="max_tokens sent with every request")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at once")
    p.add_argument("--rpm", type=float, metavar="N", help="requests per minute allowed")
    p.add_argument("--tpm", type=float, metavar="N", help="tokens per minute allowed")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts per row before it is written as failed")
    p.add_argument("--api-key-env", metavar="VAR", help="the environment variable holding the API key (default ATOMA_API_KEY)")
    p.add_argument("--allow-insecure-http", action="store_true", default=None,
                   help="allow sending the API key over plain http to a host that is not loopback")
    p.add_argument("--engine", choices=["local", "ray"],
                   help="where the job runs: local (one process, the default) or ray (pip install 'promptmill[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --engine ray: the Ray cluster to join (default: a local Ray for the job)")
    p.add_argument("--fresh", action="store_true", help="discard earlier progress for this output and start over")
    p.add_argument("--no-retry-failed", action="store_true", help="on a rerun, keep rows that failed before as they are")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds to let requests in flight finish (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p.add_argument("--date", type=_date, metavar="YYYY-MM-DD",
                   help="the date {date} (and {ds}) in the output path stand for, e.g. the run's logical date "
                        "(default: today, UTC)")
    p.add_argument("--max-failed-fraction", type=_fraction, default=0.0, metavar="F",
                   help="exit 0, not 1, when at most this fraction of the output's rows failed (default 0)")
    p.add_argument("--summary-json", metavar="PATH",
                   help="write the summary as JSON to PATH, or with '-' as the last line on stdout")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr as text (default) or one JSON object each")
    p.add_argument("--budget-usd", type=float, metavar="X",
                   help="never spend past X dollars on this output (earlier runs' cost included); exit 4 there")
    p.add_argument("--budget-per-variant", action="store_true", default=None,
                   help="each variant of a sweep gets its own equal share of the budget")
    if name == "run":
        p.add_argument("--dry-run", action="store_true", help="print the plan (see 'promptmill plan'); send nothing")
    p.add_argument("--json", metavar="PATH", help="with plan or --dry-run: the plan as JSON to PATH ('-': stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("--debug", action="store_true", help="debug logging, and a traceback on errors")


_RUN_HELP: dict[str, dict[str, str]] = {
    "run": {"help": "run a job",
            "description": "Run a batch job. Every option overrides the job file; the job file is optional."},
    "plan": {"help": "what a run would send, cost and take, sending nothing",
             "description": "Print what 'promptmill run' would send (rows, tokens, cost, time), sending nothing. "
                            "Takes the options of 'run'."},
}



def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, name) for name, key in OPTION_KEYS.items() if getattr(args, name) is not None}


def _run(args: argparse.Namespace) -> int:
    with _startup.tuned_process():
        import anyio

        from batch.errors import JobStopped
        from batch.runner import RunOptions, run_job
        from batch.spec_load import load_job
        from batch.summary import Summary

    spec = load_job(args.job, _overrides(args), check_simulator=_simulator_table_problem)
    _redact_also(os.environ.get(spec.api.api_key_env))  # a variable named by the job file only
    _log_job(spec.name)
    args.job_name = spec.name
    opts = RunOptions(
        fresh=args.fresh,
        retry_failed=not args.no_retry_failed,
        grace_s=args.grace_period,
        progress=False if args.no_progress or args.log_format == "json" else None,
        date=args.date,
    )
    code = 0
    error = None
    summary: Summary | None
    simulator = _start_simulator(spec)
    opts.base_url = simulator.base_url if simulator is not None else None
    try:
        if spec.engine.kind == "ray":
            from batch.engines.ray_engine import run_ray_job

            summary = run_ray_job(spec, opts)
        else:
            summary = anyio.run(run_job, spec, opts, backend_options=_startup.event_loop_options())
    except JobStopped as exc:
        summary = opts.summary
        log.error("%s", exc)
        code = exc.exit_code
        error = str(exc)
    finally:
        if simulator is not None:
            simulator.stop()
    if summary is not None:
        if args.summary_json == "-":
            log.info("%s", summary.render())  # stdout carries the JSON line alone
        else:
            print(summary.render(), file=sys.stdout)
    if not code and opts.exit_signal is not None:
        code = 128 + opts.exit_signal
    elif not code and summary is not None:
        from batch.outcome import finished_code

        code = finished_code(summary, args.max_failed_fraction)
    _summary_json(args, summary, code, error)
    return code


def _plan(args: argparse.Namespace) -> int:
    """``promptmill plan`` and ``run --dry-run``: the plan, text on stdout, JSON with ``--json``."""
    from batch.plan import make_plan
    from batch.plan_render import plan_dict, plan_text
    from batch.spec_load import load_job

    spec = load_job(args.job, _overrides(args), check_simulator=_simulator_table_problem)
    plan = make_plan(spec, spec.output_path(args.date), fresh=args.fresh, retry_failed=not args.no_retry_failed)
    if args.json is not None:
        doc = json.dumps(plan_dict(plan), indent=2)
        if args.json == "-":
            print(doc, file=sys.stdout)
        else:
            from batch.store import atomic_write

            atomic_write(Path(args.json), (doc + "\n").encode())
    if args.json != "-":
        print(plan_text(plan), file=sys.stdout)
    return 0


def _summary_json(args: argparse.Namespace, summary: Any, code: int, error: str | None) -> None:
    """``--summary-json``: the summary with its exit code, to a file or as the last line on stdout."""
    target = getattr(args, "summary_json", None)
    if target is None:
        return
    from batch.outcome import scheduler_summary, write_summary_json

    doc = scheduler_summary(summary, code, job=getattr(args, "job_name", None), error=error)
    if target == "-":
        sys.stdout.flush()
        print(json.dumps(doc, separators=(",", ":")), file=sys.stdout, flush=True)
    else:
        write_summary_json(doc, Path(target))


def _simulator_table_problem(table: Any) -> tuple[str | None, str] | None:
    """The job file's ``[simulator]`` table checked by the simulator's own settings."""
    from batch.simulator import table_problem

    return table_problem(table)


def _start_simulator(spec: JobSpec) -> SimServer | None:
    """For ``base_url = "simulator"``: the built-in simulator on loopback, set by ``[simulator]``."""
    if not spec.api.is_simulator:
        return None
    from batch.simulator import SimServer, config_from_table

    return SimServer(config_from_table(spec.simulator or {})).start()


def _simulate(args: argparse.Namespace) -> int:
    from batch.simulator import SettingError, config_from_args, serve

    try:
        config = config_from_args(args)
    except SettingError as exc:  # flags that do not go together, or --api-key-env unset
        log.error("%s", exc)
        return 2
    serve(config, host=args.host, port=args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batch import report

    text = report.render(Path(args.output), args.format)
    dest = args.dest or (None if args.format == "md" else str(Path(args.output).with_suffix(".report.html")))
    if dest is None or dest == "-":
        sys.stdout.write(text)
    else:
        report.save(text, Path(dest))
        log.info("report written to %s", dest)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (and exit code 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(command: str | None = "simulate") -> argparse.ArgumentParser:
    """The argument parser; the simulator's options (and its module) only when ``command`` is ``simulate``."""
    from batch import __version__

    parser = _Parser(
        prog="promptmill",
        description="Run large batches of LLM completions against an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"promptmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub)
    _add_run_parser(sub, "plan")
    rep = sub.add_parser("report", help="write a report of an output: tables and plots per variant",
                         description="Write a self-contained report (HTML, or Markdown tables) of an output.")
    rep.add_argument("output", help="a promptmill output (.parquet), sweep or not")
    rep.add_argument("-o", dest="dest", metavar="PATH",
                     help="where to write it ('-' for stdout; default: OUTPUT's name with .report.html, "
                          "or stdout for --format md)")
    rep.add_argument("--format", choices=["html", "md"], default="html", help="html (default) or md")
    rep.add_argument("--debug", action="store_true", help="debug logging, and a traceback on errors")
    rep.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sim = sub.add_parser("simulate", help="serve the built-in OpenAI-compatible simulator",
                         description="Serve the built-in OpenAI-compatible simulator on loopback.")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=8089, help="port (default 8089)")
    sim.add_argument("--debug", action="store_true", help="debug logging")
    sim.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    if command == "simulate":
        from batch.simulator import add_simulator_arguments

        add_simulator_arguments(sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    secrets = []
    env_name = getattr(args, "api_key_env", None) or "ATOMA_API_KEY"
    for name in {env_name, "ATOMA_API_KEY", "OPENAI_API_KEY"}:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            secrets.append(value)
    _setup_logging(args.debug, args.quiet, secrets, getattr(args, "log_format", "text"))

    from batch.errors import PromptmillError

    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "report":
            return _report(args)
        if args.command == "plan" or args.dry_run:
            return _plan(args)
        return _run(args)
    except PromptmillError as exc:
        if args.debug:
            log.exception("%s", exc)
        else:
            log.error("%s", exc)
        _summary_json(args, None, exc.exit_code, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        _summary_json(args, None, 130, "interrupted")
        return 130


def entry() -> NoReturn:
    """The ``promptmill`` command and ``python -m batch``: :func:`main`, then exit at once.

    An unexpected exception still exits the usual way, with its traceback.
    """
    _startup.exit_at_once(main())
