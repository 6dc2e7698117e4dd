"""The job spec: a TOML file plus command-line overrides, validated with msgspec.

A job file looks like this (every section but ``[request]``'s ``model``, the
input and output paths and the API base URL has defaults)::

    [job]
    name = "reviews"                       # default: the job file's stem, else "job"

    [input]
    path = "reviews.parquet"               # relative paths are relative to the current directory
    format = "auto"                        # "auto" (by suffix, else by content), "parquet", "jsonl", "openai_batch"
    id_column = "id"                       # missing from the input (and not set here): row numbers are ids
    prompt_column = "prompt"
    # messages_column = "messages"         # a list of {role, content} per row (chat only)
    # prompt_template = "Summarise: {title}\\n{body}"   # str.format fields over columns
    # system_prompt = "You are terse."
    passthrough = ["id", "lang"]           # columns copied to the output
    on_bad_line = "abort"                  # or "fail_row": a bad row becomes a failed result

    [output]
    path = "out/{job}-{date}.parquet"      # {date} (or {ds}) is the UTC date (YYYY-MM-DD) or --date, {job} the job name
    # schema_file = "schemas/qa.json"      # structured output: answers must follow this JSON Schema
    flush_rows = 500                       # finished rows are made durable every N rows (default: 500 or the concurrency, the larger) ...
    flush_s = 2.0                          # ... or every S seconds, whichever comes first

    [api]
    base_url = "https://api.atoma.network/v1"   # "simulator" starts the built-in simulator
    api_key_env = "ATOMA_API_KEY"          # the key itself never goes in the job file
    endpoint = "chat"                      # or "completions", "embeddings"
    stream = false

    [request]
    model = "meta-llama/Llama-3.3-70B-Instruct"
    max_tokens = 256                       # always sent
    temperature = 0.2
    response_format = { type = "json_object" }   # any other body field is passed verbatim

    [limits]
    concurrency = 32
    rpm = 600

    [pricing."meta-llama/Llama-3.3-70B-Instruct"]
    input = 0.6                            # USD per million tokens
    output = 0.6

This module defines the sections, each with its own checks; ``batch.spec_load``
reads a file and its overrides into a ``JobSpec`` (``load_job``). Overrides are
dotted keys (``{"limits.concurrency": 8}``); they win over the file and a
``None`` value means "not given". Every mistake becomes one
:class:`~batch.errors.JobFileError` naming the file, the line and the key.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import string
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import orjson

from batch.spec_errors import with_value as _with_value
from batch.sweep_spec import SweepSpec

if TYPE_CHECKING:
    from batch.scores import ScoreSpec
    from batch.variants import Variant

__all__ = [
    "ApiSpec",
    "EngineSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "OutputSpec",
    "PriceSpec",
    "RequestSpec",
    "RetrySpec",
    "is_loopback",
    "template_fields",
]

logger = logging.getLogger(__name__)

_INT64_MAX = 2**63 - 1  # what JSON encoders (orjson) take
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=_INT64_MAX)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A section of a job: typed, frozen, unknown keys refused (see :func:`batch.spec_load.load_job`)."""


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Body fields the request builder or the client sets; a job must not set them.
_RESERVED_BODY_FIELDS = frozenset({"messages", "prompt", "stream", "stream_options"})
DEFAULT_ID_COLUMN = "id"
# output paths whose ending promises another format than the Parquet written there
_NOT_PARQUET_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".xlsx"})


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a ``str.format`` template refers to, in order, without repeats.

    Raises ``ValueError`` for a malformed template or a field that is not a plain
    column name (positional ``{}``, attribute ``{a.b}`` or index ``{a[0]}`` access).
    """
    names: dict[str, None] = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or name.isdigit():
            raise ValueError("positional fields like {} are not allowed; name a column: {column}")
        if "." in name or "[" in name:
            raise ValueError(f"field {{{name}}} must be a plain column name")
        names[name] = None
    return tuple(names)


class JobSection(_Spec, frozen=True):
    name: str = "job"


class InputSpec(_Spec, frozen=True):
    """Where the rows come from and which columns make the prompt.

    ``id_column`` left unset (``None``) means the column ``"id"`` if the input
    has one, else the 0-based row index (as a string); set, it must exist.
    """

    path: Path
    format: Literal["auto", "parquet", "jsonl", "openai_batch"] = "auto"
    id_column: str | None = None
    prompt_column: str = "prompt"
    messages_column: str | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    passthrough: tuple[str, ...] = ()
    on_bad_line: Literal["abort", "fail_row"] = "abort"
    # embeddings: rows sent in one request, and the estimated tokens one request may hold
    embed_batch: Annotated[int, msgspec.Meta(ge=1, le=2048)] = 64
    embed_max_tokens: PositiveInt = 100_000

    @property
    def id_name(self) -> str:
        """The id column to look for: ``id_column``, else ``"id"``."""
        return self.id_column if self.id_column is not None else DEFAULT_ID_COLUMN

    @property
    def template_columns(self) -> tuple[str, ...]:
        return template_fields(self.prompt_template) if self.prompt_template is not None else ()

    def _problem(self) -> tuple[str, str] | None:
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/", str(self.path))
        if scheme:
            return "path", (f"is a URI ({scheme.group(1)}://): promptmill reads the input as a file; "
                            "mount the store (s3fs, gcsfuse, a shared volume) and give the mounted path")
        if self.prompt_template is not None:
            if self.messages_column is not None:
                return "prompt_template", "messages_column and prompt_template exclude each other"
            try:
                template_fields(self.prompt_template)
            except ValueError as exc:
                return "prompt_template", str(exc)
        return None


class OutputSpec(_Spec, frozen=True):
    """Where the results go; ``path`` may hold ``{date}`` and ``{job}``.

    Finished rows are written to disk as a part every ``flush_rows`` rows or
    ``flush_s`` seconds, whichever comes first: a kill loses at most those.
    ``None`` (the default) is 500 or the concurrency, the larger: see
    :meth:`JobSpec.flush_rows`.
    """

    path: str
    flush_rows: PositiveInt | None = None
    flush_s: PositiveFloat = 2.0
    # "openai_batch": a .jsonl in OpenAI's batch output format, assembled from the Parquet
    # store (``store_path``) at the end; ``error_file`` takes its failed lines
    format: Literal["parquet", "openai_batch"] = "parquet"
    error_file: str | None = None
    # structured output (README, "Structured output"): a JSON Schema inline, or in a file
    # (read into ``schema`` at load); see batch.structured
    schema: dict[str, Any] | None = None
    schema_file: str | None = None
    send_schema: bool = True
    strict: bool = True
    flatten: bool = False
    parse_attempts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 2

    def _problem(self) -> tuple[str, str] | None:
        if not self.path:
            return "path", "must not be empty"
        if self.schema is not None and self.schema_file is not None:
            return "schema_file", "schema and schema_file exclude each other; give one"
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.path)]
        except ValueError as exc:
            return "path", str(exc)
        for name in names:
            if name is not None and name not in ("date", "ds", "job"):
                return "path", f"unknown placeholder {{{name}}}; use {{date}} (or {{ds}}) or {{job}}"
        suffix = Path(self.path).suffix
        if self.format == "openai_batch":
            if suffix.lower() != ".jsonl":
                return "path", _with_value(self.path, "an openai_batch output is a .jsonl file; "
                                                      "give a path ending in .jsonl")
            if self.error_file is not None and Path(self.error_file).suffix.lower() != ".jsonl":
                return "error_file", _with_value(self.error_file, "give a path ending in .jsonl")
            return None
        if self.error_file is not None:
            return "error_file", 'needs output.format = "openai_batch" (--output-format openai_batch)'
        if suffix.lower() in _NOT_PARQUET_SUFFIXES:
            hint = ' (or set output.format = "openai_batch" for an OpenAI batch output file)' if (
                suffix.lower() == ".jsonl") else ""
            return "path", _with_value(self.path, f"ends in {suffix}: the output is a Parquet file; "
                                                  f"give a path ending in .parquet{hint}")
        return None


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine (no key is needed, plain http is fine)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiSpec(_Spec, frozen=True):
    """The server: base URL (with the version prefix, e.g. ``.../v1``), endpoint, timeouts."""

    base_url: str
    allow_insecure_http: bool = False
    api_key_env: str = "ATOMA_API_KEY"
    endpoint: Literal["chat", "completions", "embeddings"] = "chat"
    stream: bool = False
    connect_timeout_s: PositiveFloat = 10.0
    read_timeout_s: PositiveFloat = 120.0
    write_timeout_s: PositiveFloat = 30.0
    request_timeout_s: PositiveFloat = 600.0
    max_response_mb: PositiveFloat = 32.0  # an answer's body (JSON or stream), counted after decompression

    @property
    def is_simulator(self) -> bool:
        return self.base_url == "simulator"

    def _problem(self) -> tuple[str, str] | None:
        # Never echo the value: it may be the key pasted in by mistake.
        if not ENV_NAME.fullmatch(self.api_key_env):
            return "api_key_env", ("must be the name of an environment variable (like ATOMA_API_KEY), "
                                   "not the key itself")
        value = self.base_url
        if value == "simulator":
            return None
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            return "base_url", _with_value(value, "must not contain spaces or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - urlsplit checks the port only when it is read
        except ValueError as exc:
            if "@" in value:  # it may hold credentials: not quoted
                return "base_url", f"cannot be parsed as a URL: {exc}"
            return "base_url", _with_value(value, f"cannot be parsed as a URL: {exc}")
        if parts.username or parts.password:  # never quoted: it holds a password
            return "base_url", ("must not hold credentials; put the key in the environment variable "
                                "named by api.api_key_env")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "base_url", _with_value(value, 'is not an http(s) URL like https://api.atoma.network/v1, '
                                                  'nor "simulator"')
        # Plain http to a remote host is refused by the runner only when a key would be sent.
        return None


class RequestSpec(_Spec, frozen=True):
    """The request body parameters; any other key of ``[request]`` lands in ``extra``."""

    model: str
    max_tokens: PositiveInt = 256
    temperature: NonNegativeFloat | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, msgspec.Meta(ge=-_INT64_MAX - 1, le=_INT64_MAX)] | None = None
    n: PositiveInt | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The body fields after ``model`` and the prompt, in the order they are sent."""
        body: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "stop", "seed", "n"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        body.update(self.extra)
        return body

    def _problem(self) -> tuple[str, str] | None:
        clash = sorted(_RESERVED_BODY_FIELDS.intersection(self.extra))
        if clash:
            return clash[0], f"'{clash[0]}' is set by promptmill, not by the job"
        for name, value in self.params().items():
            if isinstance(value, float) and not math.isfinite(value):
                return name, _with_value(value, "is not a finite number (JSON has no inf or nan)")
            try:
                orjson.dumps(value)
            except TypeError as exc:  # an integer beyond 64 bits
                return name, _with_value(value, f"cannot be sent as JSON ({exc})")
        return None


class LimitsSpec(_Spec, frozen=True):
    concurrency: PositiveInt = 32
    rpm: PositiveFloat | None = None
    tpm: PositiveFloat | None = None
    # USD for the whole output (earlier runs' cost included); see batch.budget
    budget_usd: PositiveFloat | None = None
    budget_per_variant: bool = False  # each variant of a sweep its own share of budget_usd


class RetrySpec(_Spec, frozen=True):
    max_attempts: PositiveInt = 5
    initial_wait_s: NonNegativeFloat = 1.0
    max_wait_s: NonNegativeFloat = 60.0
    row_budget_s: PositiveFloat = 900.0
    # stop the job (exit 3) when nothing has succeeded for this long and the last
    # rows (twice the concurrency, 10 at least) all failed in ways that are retried
    outage_s: PositiveFloat = 300.0


class EngineSpec(_Spec, frozen=True):
    """Where the job runs: ``local`` (one process, the default) or ``ray`` (batch.engines.ray_engine)."""

    kind: Literal["local", "ray"] = "local"
    workers: PositiveInt = 2  # ray: worker actors, each with its share of limits.concurrency
    cpus_per_worker: PositiveFloat = 1.0  # ray: CPUs each worker actor reserves
    address: str | None = None  # ray: a cluster to join (``ray://...`` or ``auto``); None: a local Ray for the job


class PriceSpec(_Spec, frozen=True):
    """USD per million tokens; ``cached_input`` left out of a job file is ``input``."""

    input: NonNegativeFloat
    output: NonNegativeFloat
    cached_input: NonNegativeFloat


class JobSpec(_Spec, frozen=True):
    """A validated job. ``source`` is the job file it came from (``None``: overrides only)."""

    input: InputSpec
    output: OutputSpec
    api: ApiSpec
    request: RequestSpec
    job: JobSection = msgspec.field(default_factory=JobSection)
    limits: LimitsSpec = msgspec.field(default_factory=LimitsSpec)
    retry: RetrySpec = msgspec.field(default_factory=RetrySpec)
    pricing: dict[str, PriceSpec] = msgspec.field(default_factory=dict)
    simulator: dict[str, Any] | None = None
    sweep: SweepSpec | None = None
    engine: EngineSpec = msgspec.field(default_factory=EngineSpec)
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.job.name

    def variants(self) -> tuple[Variant, ...]:
        """The variants this job asks (see :mod:`batch.variants`): one for a plain job."""
        from batch.variants import expand

        return expand(self)

    @property
    def samples(self) -> int:
        """Answers asked per (row, variant): ``[sweep] samples``, 1 for a plain job."""
        return self.sweep.samples if self.sweep is not None else 1

    @property
    def is_sweep(self) -> bool:
        """Whether the job has a grid or listed variants (a ``[sweep]`` with only scores is not one)."""
        return self.sweep is not None and self.sweep.varies

    def baseline(self) -> str:
        """The variant the others are compared with: ``[sweep] baseline``, else the first."""
        if self.sweep is not None and self.sweep.baseline is not None:
            return self.sweep.baseline
        return self.variants()[0].name

    @property
    def scores(self) -> tuple[ScoreSpec, ...]:
        """The ``[[sweep.score]]`` specs (none for a job without them)."""
        return self.sweep.score if self.sweep is not None else ()

    def settings(self) -> dict[str, Any]:
        """The job's settings as JSON types, for the output's metadata (``source`` left out)."""
        doc: dict[str, Any] = msgspec.to_builtins(self, enc_hook=str)
        doc.pop("source", None)
        return doc

    def flush_rows(self) -> int:
        """Rows a part holds: ``[output] flush_rows``, else 500 or the concurrency, the larger.

        With thousands of requests in flight, 500-row parts would hold workers back
        waiting for the disk (the rows at risk are held to concurrency + flush_rows),
        and a kill puts that many requests at risk anyway.
        """
        return self.output.flush_rows or max(500, self.limits.concurrency)

    def output_path(self, now: datetime | date | None = None) -> Path:
        """The output path with ``{date}`` and ``{ds}`` (UTC, YYYY-MM-DD, of ``now``: a date is
        taken as it is, e.g. a scheduler's logical date) and ``{job}`` filled in."""
        day = _day(now)
        return Path(self.output.path.format(date=day, ds=day, job=self.name))

    def store_path(self, output: Path) -> Path:
        """Where the durable Parquet output of ``output`` is: itself, or for an
        ``openai_batch`` output its ``.parquet`` sibling (``out/b.jsonl``: ``out/b.parquet``)."""
        return output.with_suffix(".parquet") if self.output.format == "openai_batch" else output

    def error_path(self, now: datetime | date | None = None) -> Path | None:
        """``output.error_file`` with ``{date}``, ``{ds}`` and ``{job}`` filled in, or None."""
        if self.output.error_file is None:
            return None
        day = _day(now)
        return Path(self.output.error_file.format(date=day, ds=day, job=self.name))


def _day(now: datetime | date | None) -> str:
    """``now`` (default: the current time) as a UTC date, YYYY-MM-DD."""
    when = now if now is not None else datetime.now(UTC)
    if isinstance(when, datetime) and when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d")
