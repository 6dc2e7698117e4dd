"""How a run ended, for schedulers: its exit code and a small JSON summary.

The exit codes and their meanings are ``batch.errors.EXIT_REASONS``. This
module decides the code of a run that finished (0 or 1, by the share of
failed rows), and builds the summary a scheduler reads: the run's counts,
tokens, cost, totals per model, paths and why it ended. Never rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from batch.errors import EXIT_REASONS
from batch.summary import Summary

__all__ = ["failed_fraction", "finished_code", "scheduler_summary", "write_summary_json"]


def failed_fraction(summary: Summary) -> float:
    """Failed rows in the output (this run's, and earlier ones kept by --no-retry-failed) over all its rows."""
    failed = summary.rows_failed + summary.rows_failed_kept
    total = summary.rows_ok + summary.rows_failed + summary.rows_skipped
    return failed / total if total else 0.0


def finished_code(summary: Summary, max_failed_fraction: float = 0.0) -> int:
    """0, or 1 when more than ``max_failed_fraction`` of the output's rows failed (0: any failed row)."""
    failed = summary.rows_failed + summary.rows_failed_kept
    if failed == 0:
        return 0
    return 1 if failed_fraction(summary) > max_failed_fraction else 0


def scheduler_summary(
    summary: Summary | None, code: int, *, job: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """The run's summary with its exit code and reason; ``error`` is the one line of a run that stopped.

    A run refused at the start (bad input, the output locked) has no summary:
    then only the job's name, the code, the reason and the error are given.
    """
    doc: dict[str, Any] = {"job": job}
    if summary is not None:
        doc = summary.as_dict()
        doc["rows_total"] = summary.rows_ok + summary.rows_failed + summary.rows_skipped
        doc["summary_path"] = str(Path(summary.output).with_name(Path(summary.output).name + ".summary.json"))
        doc["failed_fraction"] = round(failed_fraction(summary), 6)
    doc["exit_code"] = code
    doc["exit_reason"] = EXIT_REASONS.get(code, "unknown")
    doc["error"] = error
    return doc


def write_summary_json(doc: dict[str, Any], path: Path) -> None:
    """Write the summary to ``path`` whole or not at all (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
