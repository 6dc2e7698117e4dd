from __future__ import annotations

import logging

import pytest

from batch.progress import Progress


def test_without_a_terminal_progress_is_a_log_line_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    p = Progress(1000, enabled=False, log_every_s=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="batch.progress"):
        for i in range(1000):
            now[0] = i * 0.1  # 100 s in all
            p.update(ok=i % 10 != 0)
    lines = [r.getMessage() for r in caplog.records]
    assert 2 <= len(lines) <= 4  # about every 30 s, not every row
    assert lines[0].startswith("progress: ")
    assert "/1,000 rows" in lines[0] and "failed" in lines[0]
    assert p.done == 1000 and p.failed == 100
