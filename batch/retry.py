"""What is retried, how long to wait, and when to give up.

:func:`classify` is the one place that reads the outcome table of the design:

    retry   408, 409, 425, 429 (not a spent quota), 5xx, connection errors and
            timeouts, cut-off streams and unparseable bodies (ResponseError),
            an answer that breaks the job's schema (InvalidOutputError: asked
            again at once, no backoff, until ``output.parse_attempts`` re-asks)
    fail    any other 4xx (400, 404, 413, 422, ...), and a 2xx holding a value no
            column can hold (BadValueError): the row fails, the job goes on
    fatal   401, 402, 403, and a 429 whose code says the quota or balance is spent
            (OpenAI's ``insufficient_quota``): the job stops

:class:`RetryPolicy` runs one row's attempts with tenacity's ``AsyncRetrying``
(``sleep`` and the clock are injected). It waits exponentially with jitter,
``initial_wait_s * 2**(n-1)`` capped at ``max_wait_s``, drawn uniformly from the
upper half of that span so that rows failing together do not retry together.
A ``Retry-After`` (or ``retry-after-ms``, or either under a gateway's prefix,
as LiteLLM's ``llm_provider-retry-after``; read by ``batch.ratelimits``) header wins over the backoff. It stops
after ``max_attempts`` or when the next wait would take the row past
``row_budget_s``, whichever comes first, and raises the last error with
``attempts`` and ``row_id`` set. Each retry is logged once, at WARNING, with the
row id, the attempt, the wait and the cause (status and error code, or the
error class), never a message body or header that could carry a key; a re-ask
of an answer that broke the schema is logged only the first time for its kind.

429s and the limiter. When the attempts report their 429s to a shared
:class:`batch.limiter.Limiter` (pass it as ``limiter=``), the limiter has
already paused every worker, for the ``Retry-After`` when the server sent one,
and the retried attempt's ``acquire`` waits out that pause. Waiting the
backoff or ``Retry-After`` again here would double the wait and leave the
row's slot idle while the server has room again, so a retried 429 then waits
only a short jitter (up to a tenth of ``initial_wait_s``) to spread the
restart. Without a limiter, a 429 waits like any other retry.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from batch.errors import (
    APIConnectionError,
    APIStatusError,
    BadValueError,
    InvalidOutputError,
    RequestError,
    ResponseError,
)
from batch.ratelimits import retry_after

if TYPE_CHECKING:
    from batch.limiter import Limiter

__all__ = ["Outcome", "RetryPolicy", "RetrySettings", "classify"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = Literal["retry", "fail", "fatal"]

_RETRY_STATUSES = frozenset({408, 409, 425, 429})
_FATAL_STATUSES = frozenset({401, 402, 403})
# Error codes that say the account has no quota or balance left (any case): OpenAI's
# insufficient_quota, billing_hard_limit_reached, and the like from other providers.
_SPENT = re.compile(r"quota|balance|billing|credit|funds|payment", re.IGNORECASE)


def classify(exc: BaseException) -> Outcome:
    """Whether a failed request is retried, fails its row, or stops the job.

    Anything that is not a :class:`RequestError` is a bug, not a server answer,
    and is ``"fatal"``.
    """
    if isinstance(exc, BadValueError):
        return "fail"  # a value no column can hold: the same answer again would be paid again
    if isinstance(exc, InvalidOutputError):
        return "fail" if exc.final else "retry"  # the re-asks output.parse_attempts allows are spent
    if isinstance(exc, APIConnectionError):
        # A certificate that does not verify fails every request to that server the same way.
        return "fatal" if exc.code == "certificate_verify_failed" else "retry"
    if isinstance(exc, ResponseError):
        return "retry"
    if not isinstance(exc, RequestError):
        return "fatal"
    status = exc.http_status
    if status is None:
        return "fail" if isinstance(exc, APIStatusError) else "retry"
    if status in _FATAL_STATUSES:
        return "fatal"
    if status == 429:
        return "fatal" if exc.code and _SPENT.search(exc.code) else "retry"
    if status in _RETRY_STATUSES or status >= 500:
        return "retry"
    return "fail"


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How hard one row tries. ``max_attempts`` counts the first attempt."""

    max_attempts: int = 5
    initial_wait_s: float = 1.0
    max_wait_s: float = 60.0
    row_budget_s: float = 900.0
    jitter: bool = True
    # a wait past this stops the job (the runner says so): no "retrying in" line for it
    outage_s: float = math.inf

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_wait_s < 0 or self.max_wait_s < 0 or self.row_budget_s <= 0:
            raise ValueError("waits must not be negative and the row budget must be positive")


class _Wait(wait_base):
    """Retry-After when the server sent one, else capped exponential backoff with jitter."""

    def __init__(self, settings: RetrySettings, rng: random.Random, paced_429: bool) -> None:
        self._settings = settings
        self._rng = rng
        self._paced_429 = paced_429

    def __call__(self, retry_state: RetryCallState) -> float:
        s = self._settings
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, InvalidOutputError):
            return 0.0  # the server is fine, the answer was not: ask again at once
        if isinstance(exc, RequestError):
            if self._paced_429 and exc.http_status == 429:
                return self._rng.uniform(0.0, s.initial_wait_s / 10.0)
            asked = retry_after(exc.headers)
            if asked is not None:
                return asked
        try:
            wait = min(s.max_wait_s, s.initial_wait_s * 2.0 ** (retry_state.attempt_number - 1))
        except OverflowError:
            wait = s.max_wait_s
        return self._rng.uniform(wait / 2.0, wait) if s.jitter else wait


class _StopAtBudget(stop_base):
    """Stop when the next wait would end past the row's time budget (on the injected clock)."""

    def __init__(self, budget_s: float, clock: Callable[[], float], start: float) -> None:
        self._budget_s = budget_s
        self._clock = clock
        self._start = start

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock() - self._start + retry_state.upcoming_sleep >= self._budget_s


def _cause(exc: BaseException) -> str:
    if isinstance(exc, RequestError) and exc.http_status is not None:
        # a gateway's code can be the status again (LiteLLM: "code": "429"): said once
        if exc.code and exc.code != str(exc.http_status):
            return f"HTTP {exc.http_status} {exc.code}"
        return f"HTTP {exc.http_status}"
    return type(exc).__name__


class RetryPolicy:
    """Runs one row's attempts: retries what :func:`classify` says, waits, gives up."""

    def __init__(
        self,
        settings: RetrySettings = RetrySettings(),
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self._limiter = limiter
        self._wait = _Wait(settings, rng or random.Random(), paced_429=limiter is not None)
        self._reasks_told: set[str] = set()  # kinds of broken answers already logged (re-asks are counted instead)

    async def call(self, attempt: Callable[[], Awaitable[T]], *, row_id: str) -> tuple[T, int]:
        """Run ``attempt`` until it succeeds; return its result and the attempts used.

        On giving up, or at once for a "fail" or "fatal" error, the last
        :class:`RequestError` is raised with ``attempts`` and ``row_id`` set.
        Other exceptions propagate untouched.
        """
        start = self._clock()
        # Most rows succeed at once: the first attempt runs bare, and tenacity's
        # machinery (a few objects per call) is set up only after a retryable
        # failure, which it then sees as its own first attempt.
        try:
            return await attempt(), 1
        except RequestError as exc:
            if classify(exc) != "retry":
                exc.row_id = row_id
                exc.attempts = 1
                raise
            first: RequestError | None = exc

        attempts = 0

        async def counted() -> T:
            nonlocal attempts, first
            attempts += 1
            if first is not None:
                failed, first = first, None
                raise failed
            return await attempt()

        limiter = self._limiter

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            if limiter is not None and isinstance(exc, RequestError) and exc.http_status == 429:
                wait += limiter.blocked_for()  # the pause every worker waits out in the limiter: the real wait
            if wait > self.settings.outage_s:
                return  # not a wait that will be taken: the job stops, and says so
            if isinstance(exc, InvalidOutputError):
                if exc.kind not in self._reasks_told:  # a re-ask is no trouble with the server: said once a kind
                    self._reasks_told.add(exc.kind)
                    logger.warning("row %s: %s; asking again (answers of this kind are re-asked without a word "
                                   "more, and counted in the summary)", row_id, exc.message)
                return
            logger.warning(
                "row %s: attempt %d failed (%s), retrying in %.2f s",
                row_id,
                state.attempt_number,
                _cause(exc) if exc is not None else "?",
                wait,
            )

        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self.settings.max_attempts)
            | _StopAtBudget(self.settings.row_budget_s, self._clock, start),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: classify(exc) == "retry"),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            result: T = await retrying(counted)
        except RequestError as exc:
            exc.row_id = row_id
            exc.attempts = attempts
            raise
        return result, attempts
