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
from batch.choices import per_choice
from batch.client import Client, Reply
from batch.embed_group import split_usage
from batch.errors import APIConnectionError, InvalidOutputError, RequestError
from batch.job import Job
from batch.limiter import Limiter
from batch.pricing import Price, PriceTable
from batch.ratelimits import has_rate_headers, retry_after
from batch.reask import checked, paid
from batch.records import Request, Result, Usage
from batch.retry import RetryPolicy, classify
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
                worst = self._worst_case(request)
                if worst is None:  # a batch file's line names a model without a price, under a budget
                    job.record(self._unpriced(request))
                    continue
                hold = await self.money.reserve(self._variant(request), worst)
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
                            partial(checked, self._attempt, request, self.format, invalid), row_id=request.id
                        )
                except RequestError as exc:
                    exc.row_id = request.id
                    outcome = classify(exc)
                    # an embeddings group's members each get a row
                    failed = [self._failure(m, exc, clock() - started, invalid) for m in request.group or (request,)]
                    self._settle(hold, failed)  # answers that broke the schema were paid: the budget counts them
                    if outcome == "fatal":
                        job.stop_lane(self.lane, exc)
                        if job.stopping:
                            return
                        continue
                    for result in failed:  # asked with n: every sample fails alike
                        for each in per_choice(result, request.choices):
                            job.record(each)
                    self._tell_first(exc)
                    down = outcome == "retry" and exc.http_status != 429 and not isinstance(exc, InvalidOutputError)
                    if self._outage(exc, down, clock()):
                        return
                    continue
                finally:
                    job.in_flight -= 1
                self.down_rows = 0
                self.last_ok = clock()
                results = self._results(request, reply, attempts, parsed, invalid)
                self._settle(hold, results)
                for result in results:  # asked with n: one row per choice, the usage shared out
                    for each in per_choice(result, request.choices, reply.completion):
                        job.record(each)

    def _settle(self, hold: Hold, results: list[Result]) -> None:
        """End a request's hold on the budget, once for it (an embeddings group: for all its rows): its real
        cost (re-asks included); with no usage it is counted at its reservation, the worst case, unless it
        failed with no answer at all (nothing paid)."""
        if all(r.status == "failed" and r.prompt_tokens is None and not r.invalid_answers for r in results):
            self.money.release(hold)
        elif any(r.prompt_tokens is None for r in results):
            self.money.settle(hold, None)
        else:
            self.money.settle(hold, sum(r.cost_usd or 0.0 for r in results))

    def _variant(self, request: Request) -> str:
        """The ledger's pool of a request: its variant (batch.fanout names it on every request it builds)."""
        return request.variant if request.variant is not None else self.job.fanout.variants[0].name

    def _worst_case(self, request: Request) -> float | None:
        """The most this row may cost (0 for a model without a price: a budget refuses those at start).

        A batch file's line may name another model than the job's: its price is that model's, and
        None when it has none under a budget (its cost could not be bounded). An embeddings
        request has no answer tokens: its worst case is its prompt. With a schema, every re-ask
        ``output.parse_attempts`` allows is paid too.
        """
        model, _ = self._model(request)
        price = self.money.prices.get(self._variant(request))
        if model != self._variant_model(request):
            price = self.prices.get(model)
            if price is None and self.money.limit is not None:
                return None
        if price is None:
            return 0.0
        asks = 1 if self.format is None else 1 + self.format.parse_attempts
        return asks * worst_case(price, request.est_prompt_tokens, answer_tokens(request.body))

    def _unpriced(self, request: Request) -> Result:
        model, endpoint = self._model(request)
        return Result(
            index=request.index, id=request.id, passthrough=request.passthrough,
            fingerprint=request.fingerprint, model=model, endpoint=endpoint, status="failed",
            attempts=0, error_code="unpriced",
            error=f"the model {model!r} has no price and the job has a budget: its cost cannot be bounded, "
                  f"so it was not sent; add [pricing.\"{model}\"] to the job file (USD per million tokens)",
            variant=request.variant, sample=request.sample,
        )

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
            reply = await client.complete(body, request.endpoint or None, request.choices)
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

    def _results(self, request: Request, reply: Reply, attempts: int, parsed: Any = None,
                 invalid: list[Reply] | None = None) -> list[Result]:
        """One result a row (a structured one: its parsed answer, and every answer it took paid);
        an embeddings group's rows each get their vector and their share of the usage (split in
        proportion to the rows' estimated tokens: the server reports one usage a request)."""
        vectors = reply.completion.vectors
        if not request.group:
            usage = paid([*invalid, reply]) if invalid else reply.completion.usage
            return [self._success(request, reply, attempts, usage,
                                  vectors[0] if vectors and len(vectors) == 1 else None, parsed, invalid)]
        vectors = vectors or []
        members = request.group
        usages = split_usage(reply.completion.usage, [m.est_prompt_tokens for m in members])
        return [self._success(member, reply, attempts, usages[i], vectors[i] if i < len(vectors) else None)
                for i, member in enumerate(members)]

    def _variant_model(self, request: Request) -> str:
        return self.job.model if request.variant is None else self.job.fanout.model_of[request.variant]

    def _model(self, request: Request) -> tuple[str, str]:
        """The model and endpoint a request asked: its variant's, or those a batch file's line names."""
        asked = request.body.get("model")
        model = asked if isinstance(asked, str) else self._variant_model(request)
        if request.endpoint:
            return model, request.endpoint
        if request.variant is None:
            return model, self.job.endpoint
        return model, self.job.fanout.endpoint_of[request.variant]

    def _success(self, request: Request, reply: Reply, attempts: int, u: Usage | None,
                 embedding: list[float] | None, parsed: Any = None, invalid: list[Reply] | None = None) -> Result:
        c = reply.completion
        model, endpoint = self._model(request)
        prices = self.price_of.get(request.variant or "", self.prices)
        columns = None if self.format is None else self.format.values(parsed, len(invalid or ()))
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
            embedding=embedding, response_body=None if reply.body is None else reply.body.decode("utf-8", "replace"),
            request_id=reply.headers.get("x-request-id"), columns=columns, invalid_answers=len(invalid or ()),
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
        u = paid(invalid) if invalid else None  # answers that broke the schema were paid for
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
