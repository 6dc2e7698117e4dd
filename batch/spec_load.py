"""Loading a job: the TOML file and the command-line overrides into one validated ``JobSpec``.

``load_job`` reads the file (``tomllib``), refuses a secret in it, lays the dotted
overrides over it, converts each section with msgspec (``batch.spec`` defines
them), runs each section's own checks and then those across sections (pass-through
columns, the endpoint against the messages column, the ``[simulator]`` table).
The first mistake becomes one :class:`~batch.errors.JobFileError` naming the
file, the line and the key (``batch.spec_errors`` finds them).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from batch.errors import JobFileError, PromptmillError
from batch.records import OUTPUT_COLUMNS
from batch.sources import detect_format
from batch.spec import ENV_NAME, JobSpec, PriceSpec, RequestSpec
from batch.spec_errors import (
    NOT_SHOWN,
    Key,
    Located,
    describe,
    looks_secret,
    shown,
    toml_syntax_error,
)
from batch.variants import VariantProblem

__all__ = ["TableCheck", "load_job"]

_T = TypeVar("_T")
log = logging.getLogger(__name__)


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
        if isinstance(value, list):  # [[sweep.variant]] tables
            for item in value:
                found = _find_secret(item, path) if isinstance(item, Mapping) else None
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


def _check_schema_fits(spec: JobSpec, located: Located) -> None:
    """A schema checks text answers of prompts promptmill writes: refused with an embeddings endpoint
    (no text) and with an OpenAI batch file (each line's body is sent as written, its answer kept as is)."""
    key = ("output", "schema_file" if spec.output.schema_file is not None else "schema")
    if any(v.target.endpoint == "embeddings" for v in spec.variants()):
        raise located.error("a schema checks text answers, and the embeddings endpoint answers vectors: "
                            "drop [output] schema or use endpoint = \"chat\" or \"completions\"", key)
    if spec.sweep is not None and spec.sweep.sample_mode == "n":
        raise located.error('a schema checks one answer a request, and sample_mode = "n" asks for several: '
                            'use sample_mode = "separate" with a schema', ("sweep", "sample_mode"))
    batch_file = "output" if spec.output.format == "openai_batch" else "input" if _input_format(spec) == "openai_batch" else None
    if batch_file is not None:
        raise located.error(f"a schema cannot be used with an OpenAI batch file ({batch_file}): each line's body "
                            "is sent as written and its answer kept as the server sent it; put response_format "
                            "in the lines' bodies, or drop [output] schema", key)


def _load_schema(spec: JobSpec, located: Located) -> JobSpec:
    """Read ``output.schema_file`` into ``output.schema`` and check the schema: a mistake is one
    line naming the file (or the job file's line) and the JSON pointer."""
    from batch.structured import OutputFormat, SchemaProblem, check_schema, read_schema_file

    out = spec.output
    schema: Any = out.schema
    try:
        if out.schema_file is not None:
            schema = read_schema_file(Path(out.schema_file))
        check_schema(schema)
        fmt = OutputFormat(schema, name=spec.name, send=out.send_schema, strict=out.strict,
                           flatten=out.flatten, parse_attempts=out.parse_attempts)
    except SchemaProblem as exc:
        message = f"at JSON pointer {exc.pointer}: {exc.message}"
        if out.schema_file is not None:
            raise JobFileError(message, path=out.schema_file) from None
        raise located.error(message, ("output", "schema", *map(str, exc.path))) from None
    except Exception as exc:  # fastjsonschema refusing to compile it (a bad regex, ...)
        where = out.schema_file
        message = f"the validator cannot compile the schema: {exc}"
        if where is not None:
            raise JobFileError(message, path=where) from None
        raise located.error(message, ("output", "schema")) from None
    taken = {"id", *OUTPUT_COLUMNS, *spec.input.passthrough}
    clash = [name for name in fmt.names if name in taken]
    if clash:
        raise located.error(f"the schema's property '{clash[0]}' would be a column of the same name as one "
                            "promptmill (or input.passthrough) writes; rename it or set flatten = false",
                            ("output", "flatten"))
    for where in fmt.columns.as_text:
        log.warning("%s: the schema at %s has no single column type; that field is kept as JSON text",
                    out.schema_file or spec.source or "the job", where)
    return msgspec.structs.replace(spec, output=msgspec.structs.replace(out, schema=schema))


TableCheck = Callable[[Mapping[str, Any]], tuple[str | None, str] | None]


def _input_format(spec: JobSpec) -> str | None:
    """The input's format, or None when it cannot be told yet (the source reports why when it opens)."""
    try:
        return detect_format(spec.input)
    except (PromptmillError, OSError):
        return None


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
        env_name = env if isinstance(env, str) and ENV_NAME.fullmatch(env) else "ATOMA_API_KEY"
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
    if spec.api.endpoint != "chat" and spec.input.messages_column is not None:
        raise located.error(
            f"the {spec.api.endpoint} endpoint takes a prompt, not messages; use endpoint = \"chat\"",
            ("input", "messages_column"),
        )
    if spec.output.format == "openai_batch" and spec.api.stream:
        raise located.error(
            "an openai_batch output holds each answer's JSON body as the server sent it: set stream = false",
            ("api", "stream"),
        )
    try:
        spec.variants()
    except VariantProblem as mistake:
        raise located.error(mistake.message, mistake.key) from None
    if spec.output.schema is not None or spec.output.schema_file is not None:
        _check_schema_fits(spec, located)  # before the schema is read: it may not apply at all
        spec = _load_schema(spec, located)
    if spec.is_sweep and (spec.output.format == "openai_batch" or _input_format(spec) == "openai_batch"):
        raise located.error(
            "a [sweep] cannot run over an OpenAI batch file (input or output): each line is one request with its "
            "own body; run the batch file as a plain job, or sweep over a Parquet or JSONL prompt file", ("sweep",),
        )
    if spec.simulator is not None and check_simulator is not None:
        problem = check_simulator(spec.simulator)
        if problem is not None:
            setting, message = problem
            if "wrong type" in message and setting and setting != "api_key" and setting in spec.simulator:
                message = f"{message}: {shown(spec.simulator[setting]) or NOT_SHOWN}"  # the fake server's key is never quoted
            raise located.error(message, ("simulator", setting) if setting else ("simulator",))
    return spec
