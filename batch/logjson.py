"""``--log-format json``: one JSON object per log line, for log shippers.

Each line holds ``time`` (UTC, ISO 8601), ``level``, ``event`` (the message),
``logger``, ``job`` (the job's name once it is known) and the fields the event
was logged with (``extra=``); an exception adds ``exception``. Secrets (the API
key) are replaced by ``***`` like in the text format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

__all__ = ["JsonFormatter"]

# attributes every LogRecord has: anything else on a record is a field of its event
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "promptmill"}


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]
        self.job: str | None = None

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "job": self.job,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        text = json.dumps(doc, default=str, ensure_ascii=False)
        for secret in self._secrets:
            # as it is, and as JSON escapes it (a key holding a quote or a backslash)
            text = text.replace(secret, "***").replace(json.dumps(secret, ensure_ascii=False)[1:-1], "***")
        return text
