"""Wire quirks of real providers, each with the bytes that provider sends.

The pure parsers (``parse_completion``, ``StreamAssembler``) are fed the bodies
as they arrive; the client reads them through ``httpx.MockTransport``; a whole
job shows what lands in the output file and the logs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow.parquet as pq
import pytest

from batch.client import Client
from batch.errors import APIStatusError, RequestError
from batch.limiter import Limiter
from batch.pricing import Price, PriceTable
from batch.ratelimits import retry_after
from batch.records import Completion, Usage
from batch.retry import RetryPolicy, RetrySettings
from batch.runner import RunOptions, run_job
from batch.spec import JobSpec
from batch.spec_load import load_job
from batch.wire import StreamAssembler, parse_completion
from tests.helpers import prompts, write_jsonl

BASE = "https://gateway.test/v1"

# -- the bytes ------------------------------------------------------------------

# DeepSeek: cached input is counted under its own name, next to the cache misses.
DEEPSEEK_JSON = (
    b'{"id":"930c60df-bf64-41c9-a88e-3ec75f81e00e","object":"chat.completion","created":1705651092,'
    b'"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can '
    b'I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1200,'
    b'"completion_tokens":10,"total_tokens":1210,"prompt_cache_hit_tokens":1024,"prompt_cache_miss_tokens":176},'
    b'"system_fingerprint":"fp_3a5770e1b4"}'
)
DEEPSEEK_LAST_CHUNK = (
    b'{"id":"a5e0c1f2","object":"chat.completion.chunk","created":1718345013,"model":"deepseek-chat",'
    b'"system_fingerprint":"fp_a49d71b8a1","choices":[{"index":0,"delta":{"content":""},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1200,"completion_tokens":10,"total_tokens":1210,'
    b'"prompt_cache_hit_tokens":1024,"prompt_cache_miss_tokens":176}}'
)

# Groq: a stream's usage is not in "usage" but in the last chunk's x_groq object.
GROQ_STREAM = (
    b'data: {"id":"chatcmpl-5f1a7c1e","object":"chat.completion.chunk","created":1730241104,'
    b'"model":"llama-3.1-8b-instant","system_fingerprint":"fp_a491995411","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"x_groq":{"id":"req_01jbd6g2qdfw2adyrt2az8hz4w"}}\n\n'
    b'data: {"id":"chatcmpl-5f1a7c1e","object":"chat.completion.chunk","created":1730241104,'
    b'"model":"llama-3.1-8b-instant","system_fingerprint":"fp_a491995411","choices":[{"index":0,'
    b'"delta":{"content":"Fast"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-5f1a7c1e","object":"chat.completion.chunk","created":1730241104,'
    b'"model":"llama-3.1-8b-instant","system_fingerprint":"fp_a491995411","choices":[{"index":0,'
    b'"delta":{"content":" inference."},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-5f1a7c1e","object":"chat.completion.chunk","created":1730241104,'
    b'"model":"llama-3.1-8b-instant","system_fingerprint":"fp_a491995411","choices":[{"index":0,'
    b'"delta":{},"logprobs":null,"finish_reason":"stop"}],"x_groq":{"id":"req_01jbd6g2qdfw2adyrt2az8hz4w",'
    b'"usage":{"queue_time":0.019355,"prompt_tokens":42,"prompt_time":0.002213,"completion_tokens":3,'
    b'"completion_time":0.004,"total_tokens":45,"total_time":0.006213}}}\n\n'
    b"data: [DONE]\n\n"
)

# OpenAI: a refusal (structured outputs) has a null content and the refusal beside it.
OPENAI_REFUSAL_JSON = (
    b'{"id":"chatcmpl-9nYAG9LPNonX8DAyrkwYfemr3C8HC","object":"chat.completion","created":1721596428,'
    b'"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":null,'
    b'"refusal":"I\'m sorry, I cannot assist with that request."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":81,"completion_tokens":11,"total_tokens":92},"system_fingerprint":"fp_3407719c7f"}'
)
OPENAI_REFUSAL_STREAM = (
    b'data: {"id":"chatcmpl-9nYB","object":"chat.completion.chunk","created":1721596430,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_3407719c7f","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":null,"refusal":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-9nYB","object":"chat.completion.chunk","created":1721596430,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_3407719c7f","choices":[{"index":0,'
    b'"delta":{"refusal":"I\'m sorry,"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-9nYB","object":"chat.completion.chunk","created":1721596430,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_3407719c7f","choices":[{"index":0,'
    b'"delta":{"refusal":" I cannot help with that."},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-9nYB","object":"chat.completion.chunk","created":1721596430,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_3407719c7f","choices":[{"index":0,'
    b'"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-9nYB","object":"chat.completion.chunk","created":1721596430,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_3407719c7f","choices":[],'
    b'"usage":{"prompt_tokens":81,"completion_tokens":9,"total_tokens":90}}\n\n'
    b"data: [DONE]\n\n"
)

# TGI (text-generation-inference): "data:" with no space, finish_reason "" on every
# chunk, no usage even when asked for, then [DONE].
TGI_STREAM = (
    b'data:{"object":"chat.completion.chunk","id":"","created":1712745627,"model":"tgi",'
    b'"system_fingerprint":"2.0.0-native","choices":[{"index":0,"delta":{"role":"assistant","content":"Deep"},'
    b'"logprobs":null,"finish_reason":""}]}\n\n'
    b'data:{"object":"chat.completion.chunk","id":"","created":1712745627,"model":"tgi",'
    b'"system_fingerprint":"2.0.0-native","choices":[{"index":0,"delta":{"role":"assistant","content":" learning"},'
    b'"logprobs":null,"finish_reason":""}]}\n\n'
    b'data:{"object":"chat.completion.chunk","id":"","created":1712745627,"model":"tgi",'
    b'"system_fingerprint":"2.0.0-native","choices":[{"index":0,"delta":{"role":"assistant","content":" is"},'
    b'"logprobs":null,"finish_reason":""}]}\n\n'
    b"data:[DONE]\n\n"
)

# LiteLLM proxy: the provider's Retry-After forwarded under its own prefix, and the
# status repeated as the error code.
LITELLM_429_HEADERS = {
    "content-type": "application/json",
    "llm_provider-retry-after": "7",
    "llm_provider-x-request-id": "req_6b3e",
    "x-litellm-call-id": "4d9c0f2e-55c1-4a8b-9d0e-6a1f8e0c2b77",
    "x-litellm-version": "1.55.3",
}
LITELLM_429_BODY = (
    b'{"error":{"message":"litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for '
    b'gpt-4o-mini. Please try again in 7s.","type":"None","param":"None","code":"429"}}'
)


def sse_events(stream: bytes) -> list[str]:
    """The data of each event, as an SSE parser yields it (enough for these bodies)."""
    return [block.split(b":", 1)[1].strip().decode() for block in stream.split(b"\n\n") if block]


def assemble(stream: bytes) -> Completion:
    assembler = StreamAssembler("chat")
    for data in sse_events(stream):
        assembler.feed(data)
    return assembler.finish()


def client_for(handler: Callable[[httpx.Request], httpx.Response], *, stream: bool) -> Client:
    return Client(BASE, endpoint="chat", stream=stream, api_key="sk-test", concurrency=2,
                  transport=httpx.MockTransport(handler))


def answer(body: bytes, *, stream: bool, status: int = 200,
           headers: dict[str, str] | None = None) -> Callable[[httpx.Request], httpx.Response]:
    content_type = "text/event-stream" if stream else "application/json"
    return lambda _: httpx.Response(status, content=body, headers=headers or {"content-type": content_type})


async def complete(body: bytes, *, stream: bool) -> Completion:
    async with client_for(answer(body, stream=stream), stream=stream) as client:
        return (await client.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).completion


# -- usage under other names ------------------------------------------------------


def test_deepseek_cache_hits_are_cached_tokens_and_priced_as_cached() -> None:
    completion = parse_completion(DEEPSEEK_JSON, "chat")
    assert completion.usage == Usage(prompt_tokens=1200, completion_tokens=10, total_tokens=1210, cached_tokens=1024)
    prices = PriceTable({"deepseek-chat": Price(input=0.27, output=1.10, cached_input=0.07)}, use_defaults=False)
    # 176 uncached and 1024 cached prompt tokens, 10 out
    assert prices.cost("deepseek-chat", completion.usage) == pytest.approx(
        (176 * 0.27 + 1024 * 0.07 + 10 * 1.10) / 1e6)


async def test_deepseek_stream_usage_counts_its_cache_hits() -> None:
    first = b'{"id":"a5e0c1f2","object":"chat.completion.chunk","created":1718345013,"model":"deepseek-chat",' \
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}'
    completion = await complete(b"data: " + first + b"\n\ndata: " + DEEPSEEK_LAST_CHUNK + b"\n\ndata: [DONE]\n\n",
                                stream=True)
    assert completion.text == "Hi"
    assert completion.usage is not None and completion.usage.cached_tokens == 1024


def test_openai_cached_tokens_win_over_a_deepseek_count() -> None:
    body = DEEPSEEK_JSON.replace(b'"prompt_cache_hit_tokens":1024',
                                 b'"prompt_tokens_details":{"cached_tokens":512},"prompt_cache_hit_tokens":1024')
    usage = parse_completion(body, "chat").usage
    assert usage is not None and usage.cached_tokens == 512


async def test_groq_stream_usage_in_x_groq_is_the_usage() -> None:
    completion = await complete(GROQ_STREAM, stream=True)
    assert completion.text == "Fast inference."
    assert completion.finish_reason == "stop"
    assert completion.usage == Usage(prompt_tokens=42, completion_tokens=3, total_tokens=45)
    assert assemble(GROQ_STREAM).usage == completion.usage  # the parser alone, the same


# -- a refusal is no text -------------------------------------------------------------


async def test_openai_refusal_is_kept_and_text_is_null() -> None:
    completion = await complete(OPENAI_REFUSAL_JSON, stream=False)
    assert completion.text is None
    assert completion.refusal == "I'm sorry, I cannot assist with that request."
    assert completion.usage == Usage(prompt_tokens=81, completion_tokens=11, total_tokens=92)


async def test_openai_streamed_refusal_is_kept_and_text_is_null() -> None:
    completion = await complete(OPENAI_REFUSAL_STREAM, stream=True)
    assert completion.text is None
    assert completion.refusal == "I'm sorry, I cannot help with that."
    assert completion.finish_reason == "stop"


def test_an_answer_without_refusal_has_none() -> None:
    completion = parse_completion(DEEPSEEK_JSON, "chat")
    assert completion.refusal is None and completion.text == "Hello! How can I help you today?"


# -- TGI: finish_reason "" and no usage --------------------------------------------------


async def test_tgi_stream_with_empty_finish_reasons_and_no_usage_is_complete() -> None:
    completion = await complete(TGI_STREAM, stream=True)
    assert completion.text == "Deep learning is"
    assert completion.finish_reason is None  # "" is no finish reason
    assert completion.usage is None
    assert completion.system_fingerprint == "2.0.0-native"


def test_tgi_stream_cut_before_done_is_still_cut_off() -> None:
    assembler = StreamAssembler("chat")
    for data in sse_events(TGI_STREAM)[:-1]:  # no [DONE]: the connection dropped
        assembler.feed(data)
    with pytest.raises(RequestError, match="cut off"):
        assembler.finish()


def test_an_empty_finish_reason_in_a_json_answer_is_none() -> None:
    body = DEEPSEEK_JSON.replace(b'"finish_reason":"stop"', b'"finish_reason":""')
    assert parse_completion(body, "chat").finish_reason is None


# -- LiteLLM: its Retry-After, and HTTP 429 said once -------------------------------------


def test_litellm_retry_after_counts_as_retry_after() -> None:
    assert retry_after(httpx.Headers(LITELLM_429_HEADERS)) == 7.0
    assert retry_after(httpx.Headers({"llm_provider-retry-after-ms": "1500"})) == 1.5
    # the standard header, when both are there, wins
    assert retry_after(httpx.Headers({**LITELLM_429_HEADERS, "retry-after": "2"})) == 2.0


async def test_litellm_429_pauses_the_limiter_for_its_retry_after() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await anyio.lowlevel.checkpoint()

    limiter = Limiter(clock=lambda: now[0], sleep=sleep)
    reservation = await limiter.acquire(1)
    assert limiter.on_rate_limited(httpx.Headers(LITELLM_429_HEADERS), reservation) == pytest.approx(7.0)
    await limiter.acquire(1)
    assert now[0] == pytest.approx(7.0)


async def test_litellm_429_is_retried_after_its_wait_and_logged_as_http_429_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, content=LITELLM_429_BODY, headers=LITELLM_429_HEADERS)
        return httpx.Response(200, content=DEEPSEEK_JSON, headers={"content-type": "application/json"})

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(RetrySettings(max_attempts=3), sleep=sleep, clock=lambda: 0.0)
    async with client_for(handler, stream=False) as client:
        with caplog.at_level(logging.WARNING, logger="batch.retry"):
            reply, attempts = await policy.call(lambda: client.complete({"model": "m"}), row_id="r1")
    assert attempts == 2 and reply.completion.text
    assert waits == [7.0]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "batch.retry"]
    assert "(HTTP 429)" in line and "429 429" not in line


async def test_litellm_429_error_says_http_429_once() -> None:
    async with client_for(answer(LITELLM_429_BODY, stream=False, status=429, headers=LITELLM_429_HEADERS),
                          stream=False) as client:
        with pytest.raises(APIStatusError) as info:
            await client.complete({"model": "m"})
    assert str(info.value).startswith("HTTP 429: litellm.RateLimitError")
    assert info.value.http_status == 429


# -- through a whole job: the output file and the log ----------------------------------------


def job(tmp_path: Path, n: int, *, stream: bool, **overrides: Any) -> JobSpec:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    return load_job(None, {
        "input.path": str(inp), "output.path": str(tmp_path / "out.parquet"),
        "api.base_url": "http://127.0.0.1:9/v1", "request.model": "m", "api.stream": stream,
        "retry.initial_wait_s": 0.0, "retry.max_wait_s": 0.0, "limits.concurrency": 2, **overrides,
    })


async def no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


async def run(spec: JobSpec, handler: Callable[[httpx.Request], httpx.Response]) -> list[dict[str, Any]]:
    opts = RunOptions(transport=httpx.MockTransport(handler), sleep=no_sleep, handle_signals=False, progress=False)
    await run_job(spec, opts)
    return pq.read_table(spec.output_path()).to_pylist()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_refused_row_is_ok_with_null_text_and_its_refusal_column(tmp_path: Path, stream: bool) -> None:
    body = OPENAI_REFUSAL_STREAM if stream else OPENAI_REFUSAL_JSON
    (row,) = await run(job(tmp_path, 1, stream=stream), answer(body, stream=stream))
    assert row["status"] == "ok"
    assert row["text"] is None
    assert row["refusal"].startswith("I'm sorry")


async def test_a_tgi_row_is_ok_with_its_text(tmp_path: Path) -> None:
    (row,) = await run(job(tmp_path, 1, stream=True), answer(TGI_STREAM, stream=True))
    assert (row["status"], row["text"], row["finish_reason"], row["refusal"]) == ("ok", "Deep learning is", None, None)
    assert row["prompt_tokens"] is None and row["cost_usd"] is None


async def test_a_row_failed_by_litellm_429s_says_http_429_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spec = job(tmp_path, 1, stream=False, **{"retry.max_attempts": 1})
    with caplog.at_level(logging.WARNING):
        (row,) = await run(spec, answer(LITELLM_429_BODY, stream=False, status=429, headers=LITELLM_429_HEADERS))
    assert row["status"] == "failed" and row["http_status"] == 429
    assert row["error"].startswith("HTTP 429: litellm.RateLimitError")
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("batch")]
    assert any("HTTP 429: litellm.RateLimitError" in line for line in logged)
    assert not any("429 429" in line or "429 (429)" in line for line in logged)


# -- rows without usage, through a whole job ----------------------------------------------


async def test_rows_without_usage_are_counted_and_their_cost_unknown(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # rows 0 and 1 come from a server that sends usage, the others from TGI
        with_usage = b"fact number 0 " in request.content or b"fact number 1 " in request.content
        body = DEEPSEEK_LAST_CHUNK if with_usage else None
        stream = TGI_STREAM if body is None else b"data: " + body + b"\n\ndata: [DONE]\n\n"
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    spec = job(tmp_path, 5, stream=True, **{"pricing.m.input": 1.0, "pricing.m.output": 2.0})
    opts = RunOptions(transport=httpx.MockTransport(handler), sleep=no_sleep, handle_signals=False, progress=False)
    summary = await run_job(spec, opts)
    rows = pq.read_table(spec.output_path()).to_pylist()
    assert sum(r["prompt_tokens"] is None for r in rows) == 3
    saved = json.loads(spec.output_path().with_name("out.parquet.summary.json").read_text())
    assert saved["totals"]["rows_without_usage"] == 3
    assert saved["totals"]["prompt_tokens"] == 2 * 1200
    assert saved["totals"]["cost_usd"] == pytest.approx(2 * (1200 * 1.0 + 10 * 2.0) / 1e6)
    assert "+ 3 rows of unknown cost (3 rows without usage)" in summary.render()


async def test_a_job_with_no_usage_is_not_a_free_job(tmp_path: Path) -> None:
    spec = job(tmp_path, 3, stream=True, **{"pricing.m.input": 1.0, "pricing.m.output": 2.0})
    opts = RunOptions(transport=httpx.MockTransport(answer(TGI_STREAM, stream=True)), sleep=no_sleep,
                      handle_signals=False, progress=False)
    summary = await run_job(spec, opts)
    saved = json.loads(spec.output_path().with_name("out.parquet.summary.json").read_text())
    assert saved["totals"]["cost_usd"] is None and saved["totals"]["prompt_tokens"] is None
    assert saved["totals"]["rows_without_usage"] == 3
    text = summary.render()
    assert "cost      unknown (3 rows without usage)  m" in text
    assert "$0.0" not in text
