"""Turn a row into the request body the job sends.

chat: ``messages`` is the row's messages (with the system prompt put first
unless they start with a system message), or a system message (if any) and one
user message holding the prompt column or the rendered ``prompt_template``.

completions: ``prompt`` is the system prompt and a blank line (if any) followed
by the prompt text. (A messages column with the completions endpoint is refused
when the job is loaded.)

embeddings: ``input`` is the prompt text; ``max_tokens`` is not sent (an
embedding has no answer tokens). Rows are sent several to a request
(``batch.embed_group``).

A line of an OpenAI batch file (``Row.body``) is sent as given: its ``model``
and parameters win; the job's ``model`` and ``[request]`` values fill only what
it leaves out (only ``model`` for an embeddings line), so ``max_tokens`` is
always sent to chat and completions unless the line sets it (or
``max_completion_tokens``).

The body keeps a fixed order: ``model``, ``messages``/``prompt``,
``max_tokens``, then ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` when
set, then the job's extra body fields. ``Request.fingerprint`` is a short hash
of the endpoint and the body, so a changed prompt or parameter shows up as a
changed fingerprint. A job's schema is in the body (``response_format`` or
``guided_json``), or, with ``send_schema = false``, hashed with it.

``Request.est_prompt_tokens`` is a rough count for rate limiting, no tokenizer:
characters of text / 4 plus 4 per message (``batch.tokens``, the one estimator).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import orjson

from batch.errors import InputError
from batch.records import Request, Row
from batch.spec import JobSpec
from batch.structured import OutputFormat
from batch.tokens import messages_tokens, prompt_tokens, tokens_for
from batch.variants import Variant

__all__ = ["RequestBuilder", "output_format"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def output_format(spec: JobSpec) -> OutputFormat | None:
    """The job's structured output (``[output] schema``, read at load), or None: one for all its variants."""
    out = spec.output
    if out.schema is None:
        return None
    return OutputFormat(out.schema, name=spec.name, send=out.send_schema, strict=out.strict,
                        flatten=out.flatten, parse_attempts=out.parse_attempts)


class Done(Protocol):
    """The ``(id, request fingerprint)`` keys an earlier run finished (``batch.store.ResumeIndex``)."""

    def __contains__(self, key: tuple[str, str], /) -> bool: ...


class RequestBuilder:
    """Builds one :class:`~batch.records.Request` per row; cheap enough for every row."""

    def __init__(self, spec: JobSpec, variant: Variant | None = None,
                 fmt: OutputFormat | None = None) -> None:
        self.spec = spec
        self.endpoint = spec.api.endpoint if variant is None else variant.target.endpoint
        self.chat = self.endpoint == "chat"
        self.embed = self.endpoint == "embeddings"
        self.model = spec.request.model if variant is None else variant.model
        #: the job's structured output (``[output] schema``), or None; every variant sends it its endpoint's way
        self.format = fmt if fmt is not None else output_format(spec)
        self.params = dict(spec.request.params() if variant is None else variant.params)
        if self.format is not None:
            self.params.update(self.format.body_fields(self.endpoint))
        # a schema not sent is not in the body: it joins the fingerprint itself, so a new one redoes the rows
        self._salt = b"," + self.format.fingerprint_salt() if self.format and not self.format.send else b""
        # an embeddings request (never with a schema: refused at load) takes no max_tokens
        self.embed_params = {k: v for k, v in self.params.items() if k != "max_tokens"}
        self.system_prompt = spec.input.system_prompt if variant is None else variant.system_prompt
        self.template = spec.input.prompt_template if variant is None else variant.prompt_template
        self.passthrough = spec.input.passthrough
        self.input_path = spec.input.path
        self._system_message = (
            {"role": "system", "content": self.system_prompt} if self.system_prompt is not None else None
        )
        self._prefix = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        self._endpoint_json = orjson.dumps(self.endpoint)

    def prompt_text(self, row: Row) -> str:
        """The prompt of a row that has no messages: its prompt, or the rendered template."""
        if row.prompt is not None:
            return row.prompt
        if self.template is None:
            raise InputError("row has no prompt", path=self.input_path, line=row.line)
        try:
            return self.template.format_map(row.values)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise InputError(
                f"cannot render prompt_template for this row ({type(exc).__name__}: {exc})",
                path=self.input_path,
                line=row.line,
            ) from None

    def build(self, row: Row) -> Request:
        """The request for ``row`` (not for an error row: see ``Row.error``)."""
        body, est, digest = self._body(row)
        return Request(row.index, row.id, body, self._passthrough(row), est, digest, row.endpoint or "")

    def build_unless_done(self, row: Row, done: Done, key: str | None = None,
                          extra: Mapping[str, Any] | None = None) -> Request | None:
        """The request for ``row``, or None when ``(key, fingerprint)`` is in ``done``
        (``key``: the row's resume key, its id unless given; ``extra``: body fields added last).

        A rerun of a large job skips most rows: this makes no :class:`Request` for them.
        """
        body, est, digest = self._body(row, extra)
        if (row.id if key is None else key, digest) in done:
            return None
        return Request(row.index, row.id, body, self._passthrough(row), est, digest, row.endpoint or "")

    def _passthrough(self, row: Row) -> Mapping[str, Any]:
        if not self.passthrough:
            return _EMPTY
        values = row.values
        return {name: values.get(name) for name in self.passthrough}

    def _line_body(self, body: dict[str, Any], endpoint: str) -> tuple[dict[str, Any], int, str]:
        """A batch file line's body as given, its gaps filled from the job (see the module docstring)."""
        sent = {"model": self.model, **body} if "model" not in body else dict(body)
        if endpoint != "embeddings":
            for name, value in self.params.items():
                if name not in sent and not (name == "max_tokens" and "max_completion_tokens" in sent):
                    sent[name] = value
        return sent, prompt_tokens(sent), _digest(orjson.dumps(endpoint), sent)

    def _body(self, row: Row, extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], int, str]:
        if row.body is not None:
            # a batch file job is a plain job (a sweep over one is refused at load): no extra fields
            return self._line_body(row.body, row.endpoint or self.endpoint)
        body: dict[str, Any] = {"model": self.model}
        if self.embed:
            text = self.prompt_text(row)
            body["input"] = text
            body.update(self.embed_params)  # no sample seed either: an embedding is not sampled
            return body, tokens_for(len(text), 0), _digest(self._endpoint_json, body)
        if self.chat:
            if row.messages is not None:
                messages = row.messages
                if self._system_message is not None and messages[0].get("role") != "system":
                    messages = [self._system_message, *messages]
            else:
                user = {"role": "user", "content": self.prompt_text(row)}
                messages = [self._system_message, user] if self._system_message is not None else [user]
            body["messages"] = messages
            est = messages_tokens(messages)
        else:
            if row.messages is not None:
                raise InputError(
                    f"the {self.endpoint} endpoint takes a prompt, not messages", path=self.input_path, line=row.line
                )
            prompt = self._prefix + self.prompt_text(row)
            body["prompt"] = prompt
            est = tokens_for(len(prompt), 0)
        body.update(self.params)
        if extra:
            body.update(extra)
        return body, est, _digest(self._endpoint_json, body, self._salt)


def _digest(endpoint_json: bytes, body: dict[str, Any], salt: bytes = b"") -> str:
    """The request's fingerprint: a short hash of its endpoint and body (and ``salt``: a schema not sent)."""
    return hashlib.blake2b(
        b"[" + endpoint_json + b"," + orjson.dumps(body, option=orjson.OPT_SORT_KEYS) + salt + b"]", digest_size=16,
    ).hexdigest()
