"""The request builder: the body each row sends, its fingerprint and token estimate."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from batch.errors import InputError
from batch.prompts import RequestBuilder
from batch.records import Row
from batch.spec import JobSpec
from batch.spec_load import load_job
from batch.tokens import prompt_tokens


def job(**overrides: Any) -> JobSpec:
    base = {
        "input.path": "in.jsonl",
        "output.path": "out.parquet",
        "api.base_url": "simulator",
        "request.model": "m",
    }
    return load_job(None, {**base, **overrides})


def row(prompt: str | None = "Hello there", messages: Any = None, **values: Any) -> Row:
    return Row(index=4, line=5, id="r4", prompt=prompt, messages=messages, values=values)


def test_chat_prompt_body_in_order() -> None:
    spec = job(**{"request.temperature": 0.5, "request.seed": 1, "request.logprobs": True})
    req = RequestBuilder(spec).build(row())
    assert req.body == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 256,
        "temperature": 0.5,
        "seed": 1,
        "logprobs": True,
    }
    assert list(req.body) == ["model", "messages", "max_tokens", "temperature", "seed", "logprobs"]
    assert (req.index, req.id) == (4, "r4")
    assert req.passthrough == {}


def test_chat_with_system_prompt_and_template() -> None:
    spec = job(**{"input.system_prompt": "Be terse.", "input.prompt_template": "Summarise {title}: {n:>3}"})
    req = RequestBuilder(spec).build(row(None, title="Dune", n=7))
    assert req.body["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Summarise Dune:   7"},
    ]


def test_chat_messages_get_the_system_prompt_first_unless_they_have_one() -> None:
    builder = RequestBuilder(job(**{"input.messages_column": "messages", "input.system_prompt": "S"}))
    user = [{"role": "user", "content": "u"}]
    assert builder.build(row(None, user)).body["messages"] == [{"role": "system", "content": "S"}, *user]
    own = [{"role": "system", "content": "mine"}, *user]
    assert builder.build(row(None, own)).body["messages"] == own


def test_completions_prompt_with_system_prefix() -> None:
    spec = job(**{"api.endpoint": "completions", "input.system_prompt": "Be terse."})
    req = RequestBuilder(spec).build(row("Hello"))
    assert req.body == {"model": "m", "prompt": "Be terse.\n\nHello", "max_tokens": 256}
    plain = RequestBuilder(job(**{"api.endpoint": "completions"})).build(row("Hello"))
    assert plain.body["prompt"] == "Hello"


def test_passthrough_values_travel_with_the_request() -> None:
    spec = job(**{"input.passthrough": ["lang", "n"]})
    req = RequestBuilder(spec).build(row(lang="en", n=3))
    assert req.passthrough == {"lang": "en", "n": 3}


def test_fingerprint_is_a_hash_of_endpoint_and_body() -> None:
    req = RequestBuilder(job()).build(row())
    canonical = orjson.dumps(["chat", req.body], option=orjson.OPT_SORT_KEYS)
    assert req.fingerprint == hashlib.blake2b(canonical, digest_size=16).hexdigest()
    again = RequestBuilder(job()).build(row())
    assert again.fingerprint == req.fingerprint
    assert RequestBuilder(job()).build(row("Other")).fingerprint != req.fingerprint
    assert RequestBuilder(job(**{"request.max_tokens": 9})).build(row()).fingerprint != req.fingerprint
    completions = RequestBuilder(job(**{"api.endpoint": "completions"})).build(row())
    assert completions.fingerprint != req.fingerprint


def test_token_estimate() -> None:
    req = RequestBuilder(job()).build(row("x" * 40))
    assert req.est_prompt_tokens == 10 + 4 + 3
    assert req.est_prompt_tokens == prompt_tokens(req.body)
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 8}, {"type": "image_url"}]}]
    req = RequestBuilder(job(**{"input.messages_column": "messages"})).build(row(None, parts))
    assert req.est_prompt_tokens == -(-(8 + 340) // 4) + 4 + 3  # an image part counts 340 characters
    assert req.est_prompt_tokens == prompt_tokens(req.body)
    req = RequestBuilder(job(**{"api.endpoint": "completions"})).build(row("z" * 20))
    assert req.est_prompt_tokens == 5 == prompt_tokens(req.body)


def test_a_template_that_cannot_render_names_the_row() -> None:
    spec = job(**{"input.prompt_template": "{n:d}", "input.path": "rows.jsonl"})
    with pytest.raises(InputError) as info:
        RequestBuilder(spec).build(row(None, n="seven"))
    assert str(info.value).startswith(f"{Path('rows.jsonl')}, line 5: cannot render prompt_template")


def test_bodies_do_not_share_the_top_level_dict() -> None:
    builder = RequestBuilder(job())
    first, second = builder.build(row()), builder.build(row())
    first.body["stream"] = True
    assert "stream" not in second.body
