"""An Airflow operator that runs a promptmill job (``pip install 'promptmill[airflow]'``, Airflow 3).

    PromptmillOperator(task_id="generate", job="/opt/jobs/nightly.toml",
                       output="/data/nightly/{{ ds }}.parquet", conn_id="atoma")

The job runs as a child process (``python -m batch run ... --summary-json PATH``),
so a job's memory and its event loop are its own and ``on_kill`` can drain it
with SIGTERM like any other kill. The API key is the password of the Airflow
connection ``conn_id``, put into the child's environment only: never on its
command line, in a log line or in XCom. ``execute`` returns the run's summary
(see ``batch.outcome``), which Airflow keeps as the task's XCom value.

Exit codes become task states through ``EXIT_OUTCOMES``: "fail" is
``AirflowFailException`` (no retries: a person must fix the job, key or input),
"retry" is ``AirflowException`` (Airflow's retries apply; a retry resumes the
output), and an exit 0 of an empty input skips the task.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from batch.errors import EXIT_REASONS

__all__ = ["EXIT_OUTCOMES", "PromptmillOperator"]

Outcome = Literal["success", "retry", "fail"]

# What each exit code makes of the task; a code not here is "retry".
EXIT_OUTCOMES: dict[int, Outcome] = {
    0: "success",
    1: "retry",  # failed rows: a retry sends them again, and only them
    2: "fail",  # bad job, input or output
    3: "fail",  # a refused key, a spent balance, or an outage that outlasted retry.outage_s
    4: "retry",  # the budget is reached: a retry sends nothing unless the budget was raised meanwhile
    65: "fail",  # the input changed under the job
    74: "retry",  # a disk error: it may be gone by the next try (a full disk cleaned up)
    75: "retry",  # the output's lock is held by another run, an earlier try still draining
    130: "retry",  # stopped by a signal: the next try carries on
    143: "retry",
}

# the option names of ``promptmill run`` that take no value
_FLAGS = frozenset({"fresh", "no_retry_failed", "allow_insecure_http", "no_progress", "quiet", "debug"})


class PromptmillOperator(BaseOperator):  # type: ignore[misc]  # Airflow is untyped here
    """Run a promptmill job; return its summary.

    :param job: the job file (TOML); templated.
    :param input: the input path, overriding the job file's; templated.
    :param output: the output path (``{{ ds }}`` or ``{date}`` key it by day); templated.
    :param overrides: further ``promptmill run`` options by name, e.g. ``{"concurrency": 64,
        "max_failed_fraction": 0.01}``; ``True`` for a flag such as ``fresh``; templated.
    :param date: the day ``{date}``/``{ds}`` stand for in the output path; default the run's ``ds``.
    :param conn_id: an Airflow connection whose password is the API key.
    :param api_key_env: the variable the key is put in for the job (``--api-key-env``).
    :param grace_period: seconds a killed task lets the requests in flight finish.
    """

    template_fields: Sequence[str] = ("job", "input_path", "output_path", "overrides", "date")
    template_ext: Sequence[str] = ()
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        job: str | None = None,
        input: str | None = None,
        output: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        date: str | None = None,
        conn_id: str | None = None,
        api_key_env: str = "PROMPTMILL_API_KEY",
        grace_period: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.input_path = input
        self.output_path = output  # BaseOperator.output is its XComArg
        self.overrides = dict(overrides or {})
        self.date = date
        self.conn_id = conn_id
        self.api_key_env = api_key_env
        self.grace_period = grace_period
        self._proc: subprocess.Popen[bytes] | None = None
        self._kill_timer: threading.Timer | None = None

    def command(self, summary_path: Path, ds: str | None) -> list[str]:
        """The child's command line (never the key: that goes in its environment)."""
        argv = [sys.executable, "-m", "batch", "run"]
        if self.job:
            argv.append(str(self.job))
        options: dict[str, Any] = {"input": self.input_path, "output": self.output_path, **self.overrides}
        options["date"] = self.date or ds
        if self.conn_id:
            options["api_key_env"] = self.api_key_env
        options.update(summary_json=str(summary_path), grace_period=self.grace_period, no_progress=True)
        for name, value in options.items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            if value is True and name in _FLAGS:
                argv.append(flag)
            elif isinstance(value, bool):  # --stream / --no-stream
                argv.append(flag if value else "--no-" + name.replace("_", "-"))
            else:
                argv += [flag, str(value)]
        return argv

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.conn_id:
            password = BaseHook.get_connection(self.conn_id).password
            if not password:
                raise AirflowFailException(f"the connection {self.conn_id!r} has no password (the API key)")
            env[self.api_key_env] = password
        return env

    def execute(self, context: Mapping[str, Any]) -> dict[str, Any]:
        import json

        with tempfile.TemporaryDirectory(prefix="promptmill-") as tmp:
            summary_path = Path(tmp) / "summary.json"
            argv = self.command(summary_path, context.get("ds"))
            self.log.info("running: %s", " ".join(argv))
            self._proc = subprocess.Popen(
                argv, env=self._environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the worker reaches the child through on_kill only
            )
            relay = threading.Thread(target=self._relay, args=(self._proc,), daemon=True)
            relay.start()
            try:
                code = self._proc.wait()
            finally:
                if self._kill_timer is not None:  # the child is gone: on_kill's timer has nothing to kill
                    self._kill_timer.cancel()
                    self._kill_timer = None
            relay.join(timeout=10)
            summary: dict[str, Any] = (
                json.loads(summary_path.read_text()) if summary_path.exists() else {"exit_code": code}
            )
        return self._outcome(code, summary)

    def _relay(self, proc: subprocess.Popen[bytes]) -> None:
        """The child's stdout and stderr into the task log, line by line (the child redacts its key)."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.log.info("%s", raw.decode("utf-8", "replace").rstrip())

    def _outcome(self, code: int, summary: dict[str, Any]) -> dict[str, Any]:
        outcome = EXIT_OUTCOMES.get(code, "retry")
        reason = EXIT_REASONS.get(code, f"exit code {code}")
        why = f"promptmill exited {code}: {reason}"
        if summary.get("error"):
            why += f": {summary['error']}"
        if outcome == "fail":
            raise AirflowFailException(why)
        if outcome == "retry":
            raise AirflowException(why)
        if summary.get("rows_total") == 0:
            raise AirflowSkipException("the input has no rows")
        return summary

    def on_kill(self) -> None:
        """Drain the job like SIGTERM does: requests in flight finish, finished rows are kept.

        It only sends the signal: ``execute``, still waiting on the child, returns
        once it has drained (Airflow calls this from its SIGTERM handler, on the
        thread that waits, so waiting here too would wait on itself). A timer
        kills a child that is not done within ``grace_period`` + 10 s.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.log.info("sending SIGTERM to promptmill (pid %d): it finishes the requests in flight, then stops",
                      proc.pid)
        proc.send_signal(signal.SIGTERM)
        self._kill_timer = threading.Timer(self.grace_period + 10, self._kill_if_running, args=(proc,))
        self._kill_timer.daemon = True
        self._kill_timer.start()

    @staticmethod
    def _kill_if_running(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            logging.getLogger(__name__).warning("promptmill did not stop in time: killing it")
            proc.kill()
