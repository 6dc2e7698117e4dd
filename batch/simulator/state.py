"""What the simulator remembers: its config, counters, rate window and fault RNG."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from batch.simulator.limits import SlidingWindow
from batch.simulator.replies import key_label
from batch.simulator.settings import SimConfig, changed_config

__all__ = ["SimState"]


# the body fields ``params_seen`` keeps of each request
_NOTED = ("model", "temperature", "top_p", "seed", "n", "max_tokens")


class SimState:
    """Config, counters, rate windows and the fault RNG; lives on the event loop."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._ids = 0
        self._labels: dict[str | None, str] = {}  # key -> key_label(key), to hash each key once
        self.reset()

    def reset(self) -> None:
        """Zero the counters, empty the rate window, reseed the fault RNG."""
        self.requests = 0
        self.params_seen: list[dict[str, Any]] = []
        self.by_status: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_fault: dict[str, int] = {}
        self.by_endpoint: dict[str, int] = {}
        self.completed = 0
        self.rate_limited = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: set[bytes] = set()
        self.asked: dict[bytes, int] = {}  # requests carrying a schema: how often each came
        self.repeats = 0
        self.window = SlidingWindow()
        self.rng = random.Random(self.config.seed)

    def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        new = changed_config(self.config, changes)
        if new.seed != self.config.seed:
            self.rng = random.Random(new.seed)
        self.config = new
        return new

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_key": dict(self.by_key),
            "by_fault": dict(self.by_fault),
            "by_endpoint": dict(self.by_endpoint),
            "completed": self.completed,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ids_seen": len(self.seen),
            "repeats": self.repeats,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "params_seen": list(self.params_seen),
        }

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def count(self, counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    def count_key(self, presented: str | None) -> None:
        label = self._labels.get(presented)
        if label is None:
            label = key_label(presented)
            if len(self._labels) < 4096:
                self._labels[presented] = label
        self.count(self.by_key, label)

    def note_params(self, body: dict[str, Any]) -> None:
        """What a test checks a sweep sent: model and sampling parameters of the last 10,000 bodies."""
        if len(self.params_seen) < 10_000:
            self.params_seen.append({k: body.get(k) for k in _NOTED if k in body})

    def count_seen(self, request_key: bytes) -> None:
        if request_key in self.seen:
            self.repeats += 1
        else:
            self.seen.add(request_key)

    def count_asked(self, request_key: bytes) -> int:
        """How many times (this one included) a request carrying a schema came."""
        asked = self.asked[request_key] = self.asked.get(request_key, 0) + 1
        return asked

    def count_answered(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.completed += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def admit(self, cost: int) -> tuple[bool, float]:
        """Admit one request costing ``cost`` tokens, or say how long until it would fit."""
        config = self.config
        return self.window.admit(cost, self.clock(), config.rpm, config.tpm, config.window_s)

    def limit_headers(self, retry_after: float | None) -> list[tuple[bytes, bytes]]:
        config = self.config
        return self.window.headers(self.clock(), config.rpm, config.tpm, config.window_s, retry_after)
