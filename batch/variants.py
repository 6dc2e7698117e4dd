"""Variants: what one arm of a sweep sends, and to which server (THE VARIANT CONTRACT).

A plain job has exactly one variant, named after its model, with the job's
``[request]`` parameters and its ``[api]`` / ``[limits]`` target. A job with a
``[sweep]`` grid or ``[[sweep.variant]]`` tables has one variant per grid
combination and per listed variant (see :mod:`batch.sweep_spec`). Every later
stage (prompts, limiter lanes, client, store, summary, report) reads variants
through :meth:`batch.spec.JobSpec.variants` and never the sweep table itself.

- :class:`Target`: one server a variant talks to (base URL, key variable, endpoint,
  limits). Variants with equal targets share one lane: one limiter, one connection
  pool, one share of the concurrency.
- :class:`Variant`: name, model, request parameters (``max_tokens`` included),
  the prompt settings, the target and an optional price override.

:func:`expand` turns a job into its variants and raises :class:`VariantProblem`
(a key path into the job file and a message) for the first mistake;
``batch.spec_load`` turns that into the usual one-line ``JobFileError``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import orjson

from batch.spec import (
    ApiSpec,
    InputSpec,
    LimitsSpec,
    OutputSpec,
    PriceSpec,
    RequestSpec,
    RetrySpec,
    template_fields,
)
from batch.spec_errors import Key, describe, with_value
from batch.sweep_spec import SweepSpec

if TYPE_CHECKING:
    from batch.spec import JobSpec

__all__ = ["Target", "Variant", "VariantProblem", "expand", "sample_seed", "short_model"]

# keys a variant sets that are not request parameters
_TARGET_KEYS = ("base_url", "api_key_env", "endpoint")
_LIMIT_KEYS = ("rpm", "tpm", "concurrency")
_PROMPT_KEYS = ("system_prompt", "prompt_template")
SETTINGS = frozenset({"name", "model", "price", *_TARGET_KEYS, *_LIMIT_KEYS, *_PROMPT_KEYS})
_REQUEST_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(RequestSpec)) - {"extra"}
# settings of the job a variant cannot change (everything else is sent as a body parameter)
_NOT_PER_VARIANT = (
    frozenset(f.encode_name for cls in (ApiSpec, InputSpec, OutputSpec, LimitsSpec, RetrySpec, SweepSpec)
              for f in msgspec.structs.fields(cls))
    | {"messages", "prompt", "stream_options", "extra", "path", "job"}
) - SETTINGS


class VariantProblem(ValueError):
    """A mistake in the sweep: ``key`` is the path into the job file, ``message`` says what is wrong."""

    def __init__(self, message: str, key: Key) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class Target(msgspec.Struct, frozen=True):
    """One server: variants with equal targets share a limiter, a connection pool and a concurrency."""

    name: str  # readable: the host (with a suffix when two targets share one), or "simulator"
    base_url: str
    api_key_env: str
    endpoint: str  # "chat" or "completions"
    rpm: float | None
    tpm: float | None
    concurrency: int | None  # requests in flight at once on this target


class Variant(msgspec.Struct, frozen=True):
    """One arm of a sweep (or a plain job's only one)."""

    name: str
    model: str
    params: dict[str, Any]  # the body fields after model and the prompt, max_tokens included
    system_prompt: str | None
    prompt_template: str | None
    target: Target
    price: PriceSpec | None = None  # overrides the job's price table for this variant

    def described(self) -> dict[str, Any]:
        """The variant as the output's metadata keeps it (no key, only the key's variable name)."""
        doc: dict[str, Any] = {"name": self.name, "model": self.model, "params": self.params_doc()}
        doc["target"] = {"name": self.target.name, "base_url": self.target.base_url,
                         "endpoint": self.target.endpoint}
        if self.price is not None:
            doc["price"] = msgspec.to_builtins(self.price)
        return doc

    def params_doc(self) -> dict[str, Any]:
        """What this variant changes, as the ``params`` column holds it: model, parameters, prompt settings."""
        doc: dict[str, Any] = {"model": self.model, **self.params}
        if self.system_prompt is not None:
            doc["system_prompt"] = self.system_prompt
        if self.prompt_template is not None:
            doc["prompt_template"] = self.prompt_template
        return doc


def sample_seed(row_id: str, sample: int) -> int:
    """The seed a sample sends when its variant sets none: stable across runs and machines."""
    digest = hashlib.blake2b(f"{row_id}\x00{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def short_model(model: str) -> str:
    """``Qwen/Qwen2.5-72B-Instruct`` as ``Qwen2.5-72B-Instruct``: for readable variant names."""
    return model.rsplit("/", 1)[-1] or model


def _text(key: str, value: Any) -> str:
    if isinstance(value, str):
        return short_model(value) if key == "model" else value
    return orjson.dumps(value).decode()


def _auto_name(entry: Mapping[str, Any], model: str) -> str:
    parts = [f"{k}={_text(k, v)}" for k, v in entry.items() if k != "name"]
    return ",".join(parts) if parts else short_model(model)


def _convert(data: Any, cls: type[Any], where: Key) -> Any:
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as exc:
        message, key = describe(exc, cls, data)
        raise VariantProblem(message, (*where, *key[:1])) from None


def _check_keys(entry: Mapping[str, Any], where: Key, known_params: set[str], in_grid: bool) -> None:
    for key in entry:
        at = (*where, key) if not in_grid else (*where[:-1], key)
        if key in _NOT_PER_VARIANT:
            raise VariantProblem(f"unknown key '{key}' in a variant: a variant sets the model, request "
                                 "parameters, system_prompt, prompt_template, base_url, api_key_env, endpoint, "
                                 "rpm, tpm, concurrency and price; this one is set for the whole job", at)
        known = SETTINGS | _REQUEST_FIELDS | known_params
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
            if close:
                raise VariantProblem(f"unknown key '{key}' in a variant (did you mean '{close[0]}'?)", at)


class _Builder:
    """Expands one job's sweep: each entry checked against the job's own sections."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.request = msgspec.to_builtins(spec.request)
        self.api = msgspec.to_builtins(spec.api)
        self.limits = msgspec.to_builtins(spec.limits)

    def entry(self, entry: Mapping[str, Any], name: str, where: Key) -> tuple[Variant, tuple[Any, ...]]:
        spec = self.spec
        request = dict(self.request)
        extra = dict(request.get("extra") or {})
        for key, value in entry.items():
            if key in _REQUEST_FIELDS:
                request[key] = value
            elif key not in SETTINGS:
                extra[key] = value
        request["extra"] = extra
        req: RequestSpec = _convert(request, RequestSpec, where)
        problem = req._problem()
        if problem is not None:
            raise VariantProblem(problem[1], (*where, problem[0]))
        if spec.sweep is not None and spec.sweep.sample_mode == "n" and "n" in req.params():
            raise VariantProblem('sets n: with sample_mode = "n" the sweep sets n = samples', (*where, "n"))
        api: ApiSpec = _convert({**self.api, **{k: entry[k] for k in _TARGET_KEYS if k in entry}}, ApiSpec, where)
        if spec.sweep is not None and spec.sweep.sample_mode == "n" and api.endpoint == "embeddings":
            raise VariantProblem('the embeddings endpoint answers one vector a text: sample_mode = "n" asks for '
                                 'several answers; use sample_mode = "separate"', (*where, "endpoint"))
        problem = api._problem()
        if problem is not None:
            raise VariantProblem(problem[1], (*where, problem[0]))
        own = {k: entry[k] for k in _LIMIT_KEYS if k in entry}
        limits: LimitsSpec = _convert({**self.limits, **own}, LimitsSpec, where)
        prompts = {k: spec.input.system_prompt if k == "system_prompt" else spec.input.prompt_template
                   for k in _PROMPT_KEYS}
        for key in _PROMPT_KEYS:
            if key in entry:
                if not isinstance(entry[key], str):
                    raise VariantProblem(with_value(entry[key], "must be a string"), (*where, key))
                prompts[key] = entry[key]
        if "prompt_template" in entry:
            if spec.input.messages_column is not None:
                raise VariantProblem("messages_column and prompt_template exclude each other",
                                     (*where, "prompt_template"))
            try:
                template_fields(entry["prompt_template"])
            except ValueError as exc:
                raise VariantProblem(str(exc), (*where, "prompt_template")) from None
        price = None
        if "price" in entry:
            raw = entry["price"]
            if isinstance(raw, dict) and "cached_input" not in raw and "input" in raw:
                raw = {**raw, "cached_input": raw["input"]}
            price = _convert(raw, PriceSpec, (*where, "price"))
        base_url = api.base_url.rstrip("/")
        # the target's identity; its name and concurrency share are filled in once all are known
        raw_target = (base_url, api.api_key_env, api.endpoint, limits.rpm, limits.tpm,
                      own.get("concurrency"))
        variant = Variant(name=name, model=req.model, params=req.params(), system_prompt=prompts["system_prompt"],
                          prompt_template=prompts["prompt_template"],
                          target=Target("", base_url, api.api_key_env, api.endpoint, limits.rpm, limits.tpm, None),
                          price=price)
        return variant, raw_target


def _host(base_url: str) -> str:
    if base_url == "simulator":
        return "simulator"
    parts = urlsplit(base_url)
    return parts.netloc or base_url


def _assign_targets(spec: JobSpec, made: list[tuple[Variant, tuple[Any, ...]]]) -> tuple[Variant, ...]:
    raw = list(dict.fromkeys(t for _, t in made))
    sharing = sum(1 for t in raw if t[5] is None)
    share = max(1, spec.limits.concurrency // sharing) if sharing else spec.limits.concurrency
    names: dict[tuple[Any, ...], str] = {}
    used: dict[str, int] = {}
    for t in raw:
        host = _host(t[0])
        used[host] = used.get(host, 0) + 1
        names[t] = host if used[host] == 1 else f"{host}#{used[host]}"
    out = []
    for variant, t in made:
        target = Target(names[t], t[0], t[1], t[2], t[3], t[4], t[5] if t[5] is not None else share)
        out.append(msgspec.structs.replace(variant, target=target))
    return tuple(out)


def expand(spec: JobSpec) -> tuple[Variant, ...]:
    """The job's variants, in order: the grid's combinations, then the listed variants."""
    builder = _Builder(spec)
    sweep = spec.sweep
    if sweep is None or not sweep.varies:
        variant, raw = builder.entry({}, spec.request.model, ("request",))
        return _assign_targets(spec, [(variant, raw)])
    known_params = set(spec.request.extra)
    made: list[tuple[Variant, tuple[Any, ...]]] = []
    where_of: dict[str, Key] = {}
    grid = sweep.grid
    for key, values in grid.items():
        if key == "name":
            raise VariantProblem("a grid cannot set names; name variants in [[sweep.variant]]", ("sweep", "grid", key))
        if not values:
            raise VariantProblem("is an empty list: a grid key needs at least one value", ("sweep", "grid", key))
    if grid:
        _check_keys(dict.fromkeys(grid), ("sweep", "grid", ""), known_params, in_grid=True)
        for combo in itertools.product(*grid.values()):
            entry = dict(zip(grid, combo, strict=True))
            name = _auto_name(entry, str(entry.get("model", spec.request.model)))
            made.append(builder.entry(entry, name, ("sweep", "grid")))
            where_of.setdefault(name, ("sweep", "grid"))
    for i, entry in enumerate(sweep.variant):
        where: Key = ("sweep", "variant", i)
        _check_keys(entry, where, known_params, in_grid=False)
        given = entry.get("name")
        if given is not None and (not isinstance(given, str) or not given.strip()):
            raise VariantProblem(with_value(given, "must be a non-empty string"), (*where, "name"))
        name = given if given is not None else _auto_name(entry, str(entry.get("model", spec.request.model)))
        if name in where_of:
            raise VariantProblem(f"variant name '{name}' is used twice; names must be unique", (*where, "name"))
        where_of[name] = where
        made.append(builder.entry(entry, name, where))
    names = [v.name for v, _ in made]
    if len(set(names)) < len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise VariantProblem(f"variant name '{dup}' is used twice; names must be unique", where_of[dup])
    if sweep.baseline is not None and sweep.baseline not in names:
        raise VariantProblem(with_value(sweep.baseline, f"is not a variant; the variants are: {', '.join(names)}"),
                             ("sweep", "baseline"))
    return _assign_targets(spec, made)
