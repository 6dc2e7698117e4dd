"""The workers: take a request, wait for the rate budget, send it (with retries), record the row.

Every worker task of a job shares one :class:`Workers`: the client, the limiter,
the retry policy, and what tells an outage (rows failing in a row) from bad luck.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from batch.budget import Hold, worst_case
from batch.client import Client, Reply
from batch.errors import APIConnectionError, InvalidOutputError, RequestError
from batch.job import Job
from batch.limiter import Limiter
from batch.pricing import Price, PriceTable
from batch.ratelimits import has_rate_headers, retry_after
from batch.records import Request, Result, Usage
from batch.retry import RetryPolicy, classify
from batch.structured import Invalid, OutputFormat
from batch.tokens import answer_tokens

__all__ = ["Workers"]

log = logging.getLogger(__name__)


class Workers:
    """What the worker tasks of one job share; each task runs :meth:`work`."""

    def __init__(self, job: Job, client: Client, limiter: Limiter, policy: RetryPolicy, lane: int = 0) -> None:
        self.job = job
        self.format = job.fanout.format  # structured output: every answer is checked against its schema
        self.client = client
        self.limiter = limiter
        self.policy = policy
        self.money = job.money
        self.lane = lane  # the target these workers send to (batch.fanout)
        spec = job.spec
        self.prices = PriceTable(
            {m: Price(p.input, p.output, p.cached_input) for m, p in spec.pricing.items()}
        )
        # a variant's own price wins over the job's table for its model
        self.price_of = {
            v.name: PriceTable({v.model: Price(v.price.input, v.price.output, v.price.cached_input)},
                               use_defaults=False)
            for v in job.fanout.variants if v.price is not None
        }
        self.told: set[str] = set()  # failure codes already logged once
        self.down_after = max(10, 2 * spec.limits.concurrency)
        self.down_rows = 0  # rows failed in a row, in ways that are retried (an outage when it lasts)
        self.last_ok = job.opts.clock()

    async def work(self, receive: MemoryObjectReceiveStream[Request]) -> None:
        """Take requests until the stream ends or the job stops; send each, with retries, and record it."""
        job, clock = self.job, self.job.opts.clock
        policy = self.policy
        async with receive:
            while True:
                # ``receive`` always yields to the loop once: take a waiting request without that
                try:
                    request = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        request = await receive.receive()
                    except anyio.EndOfStream:
                        break
                except anyio.EndOfStream:
                    break
                if self.lane in job.lane_fatal:
                    continue  # this target answered fatally: its requests are dropped, the others go on
                while job.in_flight + job.unflushed >= job.max_at_risk and not job.stopping:
                    await job.flushed.wait()  # rare: the disk is slower than the answers
                if job.stopping:
                    break
                hold = await self.money.reserve(self._variant(request), self._worst_case(request))
                if hold is None or job.stopping:  # the budget is reached: this row is not sent
                    if hold is not None:
                        self.money.release(hold)
                    elif not self.money.per_variant:
                        job.stop_feeding()
                    continue
                started = clock()
                job.sent += 1
                job.in_flight += 1
                invalid: list[Reply] = []  # paid answers that broke the schema
                try:
                    if self.format is None:
                        reply, attempts = await policy.call(partial(self._attempt, request), row_id=request.id)
                        parsed = None
                    else:
                        (reply, parsed), attempts = await policy.call(
                            partial(self._checked, request, self.format, invalid), row_id=request.id
                        )
                except RequestError as exc:
                    exc.row_id = request.id
                    outcome = classify(exc)
                    failed = self._failure(request, exc, clock() - started, invalid)
                    self._settle(hold, failed)  # answers that broke the schema were paid: the budget counts them
                    if outcome == "fatal":
                        job.stop_lane(self.lane, exc)
                        if job.stopping:
                            return
                        continue
                    job.record(failed)
                    self._tell_first(exc)
                    down = outcome == "retry" and exc.http_status != 429 and not isinstance(exc, InvalidOutputError)
                    if self._outage(exc, down, clock()):
                        return
                    continue
                finally:
                    job.in_flight -= 1
                self.down_rows = 0
                self.last_ok = clock()
                result = self._success(request, reply, attempts, parsed, invalid)
                self._settle(hold, result)
                job.record(result)

    def _settle(self, hold: Hold, result: Result) -> None:
        """End a row's hold on the budget: its real cost (re-asks included); a row with no usage
        is counted at its reservation, the worst case, unless it failed with no answer at all (nothing paid)."""
        if result.status == "failed" and result.prompt_tokens is None and not result.invalid_answers:
            self.money.release(hold)
        else:
            self.money.settle(hold, None if result.prompt_tokens is None else result.cost_usd or 0.0)

    def _variant(self, request: Request) -> str:
        """The ledger's pool of a request: its variant (batch.fanout names it on every request it builds)."""
        return request.variant if request.variant is not None else self.job.fanout.variants[0].name

    def _worst_case(self, request: Request) -> float:
        """The most this row may cost (0 for a model without a price: a budget refuses those at start);
        with a schema, every re-ask ``output.parse_attempts`` allows is paid too."""
        price = self.money.prices.get(self._variant(request))
        if price is None:
            return 0.0
        asks = 1 if self.format is None else 1 + self.format.parse_attempts
        return asks * worst_case(price, request.est_prompt_tokens, answer_tokens(request.body))

    def _outage(self, exc: RequestError, down: bool, now: float) -> bool:
        """Count a failed row toward an outage (``down``: it failed in a way that is retried,
        not a 429); stop the job once it is one (see :mod:`batch.runner`)."""
        if not down:
            self.down_rows = 0  # the server answered: it is up
            return False
        self.down_rows += 1
        if self.down_rows < self.down_after or now - self.last_ok < self.job.outage_s:
            return False
        self.job.stop_now(exc, (
            f"no request has succeeded for {now - self.last_ok:.0f} s and the last {self.down_rows:,} rows "
            f"failed ({exc.message}): stopping; rows already finished are kept, rerun the same command "
            "once the server is back (retry.outage_s sets how long to wait)"
        ))
        return True

    async def _attempt(self, request: Request) -> Reply:
        """One attempt at one row: wait for the rate budget, send, tell the limiter how it went."""
        client, limiter, job = self.client, self.limiter, self.job
        body = request.body
        # what a server charges at admission: the prompt plus every token the answer may take
        reserve = request.est_prompt_tokens + answer_tokens(body)
        reservation = await limiter.acquire(reserve)
        try:
            reply = await client.complete(body)
        except APIConnectionError:
            limiter.release(reservation)
            raise
        except RequestError as exc:
            asked = retry_after(exc.headers) if exc.headers else None
            if exc.http_status == 429:
                pause = limiter.on_rate_limited(exc.headers, reservation)
                if asked is not None or has_rate_headers(exc.headers):
                    job.check_wait(pause, exc, "Retry-After" if asked is not None else "x-ratelimit-reset")
            else:
                limiter.settle(reservation, None)
                if asked is not None and classify(exc) == "retry":
                    job.check_wait(asked, exc, "Retry-After")
            raise
        limiter.on_response(reply.headers, reservation)
        if not limiter.free and (blocked := limiter.blocked_for()) > job.max_wait_s:
            job.check_wait(blocked, None, "x-ratelimit-reset")
        usage = reply.completion.usage
        # settle against the real prompt size; the answer's share stays reserved as the server counts it
        limiter.settle(reservation, reserve - request.est_prompt_tokens + usage.prompt_tokens if usage else None)
        return reply

    async def _checked(self, request: Request, fmt: OutputFormat, invalid: list[Reply]) -> tuple[Reply, Any]:
        """One attempt at a structured row: the answer parsed and validated, or InvalidOutputError
        (asked again by the retry policy; ``final`` once ``output.parse_attempts`` re-asks are spent)."""
        reply = await self._attempt(request)
        text = reply.completion.text
        try:
            return reply, fmt.validator.parse(text)
        except Invalid as exc:
            invalid.append(reply)
            raise InvalidOutputError(
                f"the answer does not follow the schema at {exc.pointer}: {exc.message}",
                pointer=exc.pointer, raw=text, reply=reply, final=len(invalid) > fmt.parse_attempts, kind=exc.kind,
            ) from None

    def _model(self, request: Request) -> tuple[str, str]:
        """The model and endpoint a request asked (its variant's)."""
        fanout = self.job.fanout
        if request.variant is None:
            return self.job.model, self.job.endpoint
        return fanout.model_of[request.variant], fanout.endpoint_of[request.variant]

    def _success(self, request: Request, reply: Reply, attempts: int, parsed: Any = None,
                 invalid: list[Reply] | None = None) -> Result:
        c = reply.completion
        u = c.usage
        model, endpoint = self._model(request)
        prices = self.price_of.get(request.variant or "", self.prices)
        columns = None
        if self.format is not None:
            columns = self.format.values(parsed, len(invalid or ()))
            if invalid:
                u = _paid([*invalid, reply])  # every answer was paid for, the ones asked again too
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=model, endpoint=endpoint, status="ok",
            text=c.text, refusal=c.refusal, finish_reason=c.finish_reason,
            prompt_tokens=u.prompt_tokens if u else None,
            completion_tokens=u.completion_tokens if u else None,
            total_tokens=u.total_tokens if u else None,
            cached_tokens=u.cached_tokens if u else None,
            reasoning_tokens=u.reasoning_tokens if u else None,
            cost_usd=prices.cost(model, u),
            latency_s=reply.latency_s, ttft_s=c.ttft_s, attempts=attempts, http_status=reply.http_status,
            response_id=c.response_id, created=c.created, system_fingerprint=c.system_fingerprint,
            columns=columns, invalid_answers=len(invalid or ()),
            variant=request.variant, sample=request.sample,
        )

    def _tell_first(self, exc: RequestError) -> None:
        """Log the first failed row of each kind, so a long run shows what goes wrong as it goes."""
        code = exc.code or type(exc).__name__
        if code in self.told:
            return
        self.told.add(code)
        hint = ""
        if exc.http_status == 404:
            hint = "; check api.base_url (with its version prefix, like .../v1) and request.model"
        log.warning("row %s failed: %s%s (rows failing the same way are counted in the summary)",
                    exc.row_id, exc.message, hint)

    def _failure(self, request: Request, exc: RequestError, elapsed: float, invalid: list[Reply]) -> Result:
        model, endpoint = self._model(request)
        columns = None if self.format is None else self.format.values(None, len(invalid))
        u = _paid(invalid) if invalid else None  # answers that broke the schema were paid for
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=model, endpoint=endpoint, status="failed",
            latency_s=elapsed, attempts=exc.attempts or 1, http_status=exc.http_status,
            error_code=exc.code or type(exc).__name__, error=exc.message,
            # the last answer's text is kept, so a row that never followed the schema can be read
            text=invalid[-1].completion.text if invalid else None,
            prompt_tokens=u.prompt_tokens if u else None,
            completion_tokens=u.completion_tokens if u else None,
            total_tokens=u.total_tokens if u else None,
            cached_tokens=u.cached_tokens if u else None,
            reasoning_tokens=u.reasoning_tokens if u else None,
            cost_usd=self.price_of.get(request.variant or "", self.prices).cost(model, u) if u else None,
            columns=columns, invalid_answers=len(invalid),
            variant=request.variant, sample=request.sample,
        )


def _paid(replies: list[Reply]) -> Usage | None:
    """The usage of several answers to one row, summed (None when none of them reported any)."""
    usages = [r.completion.usage for r in replies if r.completion.usage is not None]
    if not usages:
        return None
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        total_tokens=sum(u.total_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens or 0 for u in usages),
        reasoning_tokens=sum(u.reasoning_tokens or 0 for u in usages),
    )
