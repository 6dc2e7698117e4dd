"""The job spec: a TOML file plus command-line overrides, validated with msgspec.

A job file looks like this (every section but ``[request]``'s ``model``, the
input and output paths and the API base URL has defaults)::

    [job]
    name = "reviews"                       # default: the job file's stem, else "job"

    [input]
    path = "reviews.parquet"               # relative paths are relative to the current directory
    format = "auto"                        # "auto" (by suffix, else by content), "parquet", "jsonl"
    id_column = "id"                       # missing from the input (and not set here): row numbers are ids
    prompt_column = "prompt"
    # messages_column = "messages"         # a list of {role, content} per row (chat only)
    # prompt_template = "Summarise: {title}\\n{body}"   # str.format fields over columns
    # system_prompt = "You are terse."
    passthrough = ["id", "lang"]           # columns copied to the output
    on_bad_line = "abort"                  # or "fail_row": a bad row becomes a failed result

    [output]
    path = "out/{job}-{date}.parquet"      # {date} (or {ds}) is the UTC date (YYYY-MM-DD) or --date, {job} the job name
    flush_rows = 500                       # finished rows are made durable every N rows (default: 500 or the concurrency, the larger) ...
    flush_s = 2.0                          # ... or every S seconds, whichever comes first

    [api]
    base_url = "https://api.atoma.network/v1"   # "simulator" starts the built-in simulator
    api_key_env = "ATOMA_API_KEY"          # the key itself never goes in the job file
    endpoint = "chat"                      # or "completions"
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

Overrides are dotted keys (``{"limits.concurrency": 8}``); they win over the
file and a ``None`` value means "not given". Every mistake becomes one
:class:`~batch.errors.JobFileError` naming the file, the line and the key.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import orjson

from batch.errors import JobFileError
from batch.records import OUTPUT_COLUMNS
from batch.spec_errors import (
    NOT_SHOWN,
    Key,
    Located,
    describe,
    looks_secret,
    shown,
    toml_syntax_error,
)
from batch.spec_errors import with_value as _with_value

__all__ = [
    "ApiSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "OutputSpec",
    "PriceSpec",
    "RequestSpec",
    "RetrySpec",
    "is_loopback",
    "load_job",
    "template_fields",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_INT64_MAX = 2**63 - 1  # what JSON encoders (orjson) take
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=_INT64_MAX)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A section of a job: typed, frozen, unknown keys refused (see :func:`load_job`)."""


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    id_column: str | None = None
    prompt_column: str = "prompt"
    messages_column: str | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    passthrough: tuple[str, ...] = ()
    on_bad_line: Literal["abort", "fail_row"] = "abort"

    @property
    def id_name(self) -> str:
        """The id column to look for: ``id_column``, else ``"id"``."""
        return self.id_column if self.id_column is not None else DEFAULT_ID_COLUMN

    @property
    def template_columns(self) -> tuple[str, ...]:
        return template_fields(self.prompt_template) if self.prompt_template is not None else ()

    def _problem(self) -> tuple[str, str] | None:
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

    def _problem(self) -> tuple[str, str] | None:
        if not self.path:
            return "path", "must not be empty"
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.path)]
        except ValueError as exc:
            return "path", str(exc)
        for name in names:
            if name is not None and name not in ("date", "ds", "job"):
                return "path", f"unknown placeholder {{{name}}}; use {{date}} (or {{ds}}) or {{job}}"
        suffix = Path(self.path).suffix
        if suffix.lower() in _NOT_PARQUET_SUFFIXES:
            return "path", _with_value(self.path, f"ends in {suffix}: the output is a Parquet file; "
                                                  "give a path ending in .parquet")
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
    endpoint: Literal["chat", "completions"] = "chat"
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
        if not _ENV_NAME.fullmatch(self.api_key_env):
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


class RetrySpec(_Spec, frozen=True):
    max_attempts: PositiveInt = 5
    initial_wait_s: NonNegativeFloat = 1.0
    max_wait_s: NonNegativeFloat = 60.0
    row_budget_s: PositiveFloat = 900.0
    # stop the job (exit 3) when nothing has succeeded for this long and the last
    # rows (twice the concurrency, 10 at least) all failed in ways that are retried
    outage_s: PositiveFloat = 300.0


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
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.job.name

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
        when = now if now is not None else datetime.now(UTC)
        if isinstance(when, datetime) and when.tzinfo is not None:
            when = when.astimezone(UTC)
        day = when.strftime("%Y-%m-%d")
        return Path(self.output.path.format(date=day, ds=day, job=self.name))


# --- loading -----------------------------------------------------------------

def _find_secret(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    for key, value in data.items():
        path = (*prefix, str(key))
        if prefix == () and key == "simulator":
            # The simulator's api_key is the key a fake local server expects, not a credential.
            continue
        if prefix == ("pricing",):
            # Model names, not setting names.
            if isinstance(value, Mapping):
                found = _find_secret(value, path)
                if found:
                    return found
            continue
        if looks_secret(str(key)):
            return path
        if isinstance(value, str) and value.lstrip().lower().startswith("bearer "):
            return path
        if isinstance(value, Mapping):
            found = _find_secret(value, path)
            if found:
                return found
    return None


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JobFileError("job file not found", path=path) from None
    except IsADirectoryError:
        raise JobFileError("is a directory, not a job file", path=path) from None
    except OSError as exc:
        raise JobFileError(f"cannot read the job file: {exc.strerror or exc}", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise JobFileError("not UTF-8 text, so not a TOML job file", path=path, line=bad_line) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = toml_syntax_error(exc, text)
        raise JobFileError(f"not valid TOML: {message}", path=path, line=line) from None
    return text, data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise JobFileError(
                f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a table", key=key
            )
        node = child
    node[parts[-1]] = value


def _path_hook(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError("not a path")  # spec_errors.describe says what the field takes


def _convert(data: Any, cls: type[_T], located: Located, prefix: Key = ()) -> _T:
    try:
        return msgspec.convert(data, cls, strict=True, dec_hook=_path_hook)
    except msgspec.ValidationError as exc:
        message, key = describe(exc, cls, data)
        raise located.error(message, (*prefix, *key)) from None


def _check_passthrough(names: tuple[str, ...], located: Located) -> None:
    """Pass-through columns: each once, none a column promptmill writes itself."""
    ours = {"id", *OUTPUT_COLUMNS}
    for i, name in enumerate(names):
        if name in names[:i]:
            raise located.error(f"'{name}' is listed twice", ("input", "passthrough"))
        if name in ours:
            what = "the row's id is written as 'id' anyway" if name == "id" else "rename it in the input"
            raise located.error(f"'{name}' is a column promptmill writes itself; {what}", ("input", "passthrough"))


TableCheck = Callable[[Mapping[str, Any]], tuple[str | None, str] | None]


def load_job(path: str | Path | None, overrides: Mapping[str, Any] | None = None, *,
             check_simulator: TableCheck | None = None) -> JobSpec:
    """Read and validate a job.

    ``path`` is the TOML job file, or ``None`` for a job made of overrides only
    (then ``input.path``, ``output.path``, ``api.base_url`` and ``request.model``
    must be among them). ``overrides`` maps dotted keys (``"limits.concurrency"``,
    ``"api.stream"``, ``"request.model"``, ...) to typed values; they win over the
    file, and ``None`` values are skipped. Relative paths are relative to the
    current directory, not to the job file.

    ``check_simulator`` checks the ``[simulator]`` table (the spec keeps it as given and
    does not import the simulator; the CLI passes ``batch.simulator.table_problem``):
    it returns (setting or None, message) of the first problem, or None.

    Raises :class:`JobFileError` naming the file, line and key of the first problem.
    """
    source = Path(path) if path is not None else None
    text, data = _read_toml(source) if source is not None else ("", {})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    located = Located(source, text, set(given))

    secret = _find_secret(data)
    if secret is None:
        secret = next((tuple(k.split(".")) for k in given if any(map(looks_secret, k.split(".")))), None)
    if secret is not None:
        env = data.get("api", {}).get("api_key_env") if isinstance(data.get("api"), dict) else None
        env_name = env if isinstance(env, str) and _ENV_NAME.fullmatch(env) else "ATOMA_API_KEY"
        raise located.error(
            "a job must not hold an API key or other secret; put the key in the environment "
            f"variable named by api.api_key_env ({env_name})",
            secret,
        )
    if "source" in data:
        raise located.error("unknown key", ("source",))

    for key, value in given.items():
        _set_dotted(data, key, value)
    request = data.get("request")
    if isinstance(request, dict):
        # any key RequestSpec does not name goes into the body as it is (RequestSpec refuses the reserved ones)
        known = {f.encode_name for f in msgspec.structs.fields(RequestSpec)}
        unknown = {k: v for k, v in request.items() if k not in known}
        if unknown:
            extra = request.get("extra", {})
            data["request"] = {k: v for k, v in request.items() if k in known}
            data["request"]["extra"] = {**extra, **unknown} if isinstance(extra, dict) else extra
    for section in ("input", "output", "api", "request"):
        # An absent section reports its first missing key, not "missing section".
        data.setdefault(section, {})
    job = data.get("job")
    if job is None or isinstance(job, dict):
        job = data.setdefault("job", {})
        job.setdefault("name", source.stem if source is not None else "job")

    pricing = data.pop("pricing", {})
    spec = _convert(data, JobSpec, located)
    prices = _convert(pricing, dict[str, Any], located, ("pricing",))
    for model, price in prices.items():
        if isinstance(price, dict) and "cached_input" not in price and "input" in price:
            price = {**price, "cached_input": price["input"]}
        prices[model] = _convert(price, PriceSpec, located, ("pricing", model))
    for name in ("input", "output", "api", "request"):
        problem = getattr(spec, name)._problem()
        if problem is not None:
            field, message = problem
            raise located.error(message, (name, field))
    spec = msgspec.structs.replace(spec, pricing=prices, source=source,
                                   api=msgspec.structs.replace(spec.api, base_url=spec.api.base_url.rstrip("/")))

    if spec.input.passthrough:
        _check_passthrough(spec.input.passthrough, located)
    if spec.api.endpoint == "completions" and spec.input.messages_column is not None:
        raise located.error(
            "the completions endpoint takes a prompt, not messages; use endpoint = \"chat\"",
            ("input", "messages_column"),
        )
    if spec.simulator is not None and check_simulator is not None:
        problem = check_simulator(spec.simulator)
        if problem is not None:
            setting, message = problem
            if "wrong type" in message and setting and setting != "api_key" and setting in spec.simulator:
                message = f"{message}: {shown(spec.simulator[setting]) or NOT_SHOWN}"  # the fake server's key is never quoted
            raise located.error(message, ("simulator", setting) if setting else ("simulator",))
    return spec
