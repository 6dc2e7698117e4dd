"""The workers: take a request, wait for the rate budget, send it (with retries), record the row.

Every worker task of a job shares one :class:`Workers`: the client, the limiter,
the retry policy, and what tells an outage (rows failing in a row) from bad luck.
"""

from __future__ import annotations

import logging
from functools import partial

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from batch.client import Client, Reply
from batch.embed_group import split_usage
from batch.errors import APIConnectionError, RequestError
from batch.job import Job
from batch.limiter import Limiter
from batch.pricing import Price, PriceTable
from batch.ratelimits import has_rate_headers, retry_after
from batch.records import Request, Result, Usage
from batch.retry import RetryPolicy, classify
from batch.tokens import answer_tokens

__all__ = ["Workers"]

log = logging.getLogger(__name__)


class Workers:
    """What the worker tasks of one job share; each task runs :meth:`work`."""

    def __init__(self, job: Job, client: Client, limiter: Limiter, policy: RetryPolicy) -> None:
        self.job = job
        self.client = client
        self.limiter = limiter
        self.policy = policy
        spec = job.spec
        self.prices = PriceTable(
            {m: Price(p.input, p.output, p.cached_input) for m, p in spec.pricing.items()}
        )
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
                while job.in_flight + job.unflushed >= job.max_at_risk and not job.stopping:
                    await job.flushed.wait()  # rare: the disk is slower than the answers
                if job.stopping:
                    break
                started = clock()
                job.sent += 1
                job.in_flight += 1
                try:
                    reply, attempts = await policy.call(
                        partial(self._attempt, request), row_id=request.id
                    )
                except RequestError as exc:
                    exc.row_id = request.id
                    outcome = classify(exc)
                    if outcome == "fatal":
                        job.stop_now(exc)
                        return
                    for member in request.group or (request,):
                        job.record(self._failure(member, exc, clock() - started))
                    self._tell_first(exc)
                    if self._outage(exc, outcome == "retry" and exc.http_status != 429, clock()):
                        return
                    continue
                finally:
                    job.in_flight -= 1
                self.down_rows = 0
                self.last_ok = clock()
                if request.group:
                    self._record_group(request, reply, attempts)
                else:
                    vectors = reply.completion.vectors
                    job.record(self._success(request, reply, attempts, reply.completion.usage,
                                             vectors[0] if vectors and len(vectors) == 1 else None))

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
            reply = await client.complete(body, request.endpoint or None)
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

    def _record_group(self, request: Request, reply: Reply, attempts: int) -> None:
        """One result per row of an embeddings group: its vector, and its share of the usage
        (split in proportion to the rows' estimated tokens: the server reports one usage a request)."""
        vectors = reply.completion.vectors or []
        members = request.group
        usages = split_usage(reply.completion.usage, [m.est_prompt_tokens for m in members])
        for i, member in enumerate(members):
            self.job.record(self._success(member, reply, attempts, usages[i], vectors[i] if i < len(vectors) else None))

    def _model(self, request: Request) -> str:
        """The model a request asked for: a batch file's line names its own."""
        model = request.body.get("model")
        return model if isinstance(model, str) else self.job.model

    def _success(self, request: Request, reply: Reply, attempts: int, u: Usage | None,
                 embedding: list[float] | None) -> Result:
        c = reply.completion
        model = self._model(request)
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=model, endpoint=request.endpoint or self.job.endpoint,
            status="ok",
            text=c.text, refusal=c.refusal, finish_reason=c.finish_reason,
            prompt_tokens=u.prompt_tokens if u else None,
            completion_tokens=u.completion_tokens if u else None,
            total_tokens=u.total_tokens if u else None,
            cached_tokens=u.cached_tokens if u else None,
            reasoning_tokens=u.reasoning_tokens if u else None,
            cost_usd=self.prices.cost(model, u),
            latency_s=reply.latency_s, ttft_s=c.ttft_s, attempts=attempts, http_status=reply.http_status,
            response_id=c.response_id, created=c.created, system_fingerprint=c.system_fingerprint,
            embedding=embedding, response_body=None if reply.body is None else reply.body.decode("utf-8", "replace"),
            request_id=reply.headers.get("x-request-id"),
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

    def _failure(self, request: Request, exc: RequestError, elapsed: float) -> Result:
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=self._model(request), endpoint=request.endpoint or self.job.endpoint,
            status="failed",
            latency_s=elapsed, attempts=exc.attempts or 1, http_status=exc.http_status,
            error_code=exc.code or type(exc).__name__, error=exc.message,
        )
