"""The simulator's settings, each defined once in :class:`SimConfig`.

Every field carries its type, its range (``msgspec.Meta`` constraints) and its help
text; the command-line flags (:func:`add_simulator_arguments`), the job file's
``[simulator]`` table check (:func:`table_problem`) and the admin API's changes
(:func:`changed_config`) are all generated from it. msgspec does the validating.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta

__all__ = [
    "FAULT_KINDS",
    "SettingError",
    "SimConfig",
    "add_simulator_arguments",
    "changed_config",
    "config_from_args",
    "config_from_table",
    "public_config",
    "table_problem",
]

FaultKind = Literal["500", "502", "503", "reset", "hang", "malformed", "cut"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
LimitStyle = Literal["openai", "atoma"]

_Milliseconds = Annotated[float, Meta(ge=0)]
_Seconds = Annotated[float, Meta(ge=0)]
_Positive = Annotated[int, Meta(gt=0)]
_Count = Annotated[int, Meta(ge=0)]
_Share = Annotated[float, Meta(ge=0, le=1)]
_ErrorStatus = Annotated[int, Meta(ge=400, le=599)]


def _doc(help: str, flag: str | None = None) -> Meta:
    """A field's help text, and its flag where it is not ``--field-name``."""
    return Meta(description=help, extra={"flag": flag} if flag else {})


class SimConfig(msgspec.Struct, kw_only=True):
    """Every knob of the simulator; change at run time with the admin API or ``configure``."""

    latency_ms: Annotated[_Milliseconds, _doc(
        "delay before each answer; spread over the tokens of a stream (default %(default)s)")] = 0.0
    ttft_ms: Annotated[_Milliseconds | None, _doc(
        "streams: delay before the first token (default: latency / 4)")] = None
    rpm: Annotated[_Positive | None, _doc("requests per window before 429")] = None
    tpm: Annotated[_Positive | None, _doc(
        "tokens (prompt + max_tokens * n, counted at admission) per window before 429")] = None
    window_s: Annotated[Annotated[float, Meta(gt=0)], _doc(
        "sliding window of --rpm/--tpm in seconds (default %(default)s)")] = 60.0
    limit_style: Annotated[LimitStyle, _doc(
        "429 with x-ratelimit-* and Retry-After headers (openai) or bare (atoma)")] = "openai"
    fault_rate: Annotated[_Share, _doc("share of requests that fail (0..1)")] = 0.0
    faults: Annotated[tuple[FaultKind, ...], _doc(
        f"comma-separated fault kinds (default {','.join(FAULT_KINDS)})")] = FAULT_KINDS  # type: ignore[assignment]
    seed: Annotated[int, _doc("seed of the fault RNG", flag="--fault-seed")] = 0
    invalid_output_rate: Annotated[_Share, _doc(
        "share of answers to a request carrying a JSON schema that break it (0..1)")] = 0.0
    fatal_status: Annotated[_ErrorStatus | None, _doc(
        "answer every request with this status (e.g. 401)")] = None
    fatal_after: Annotated[_Count, _doc(
        "answer this many requests normally before --fatal-status applies")] = 0
    context_tokens: Annotated[_Positive | None, _doc(
        "answer 400 context_length_exceeded above prompt + max_tokens of this many")] = None
    stream_done: Annotated[bool, _doc(
        "end streams at EOF after the usage chunk, without data: [DONE] (Atoma style)", flag="--no-done")] = True
    usage_every_chunk: Annotated[bool, _doc("put cumulative usage in every stream chunk")] = False
    keepalive: Annotated[bool, _doc("send ':keep-alive' comment lines in streams")] = False
    hang_s: Annotated[_Seconds, _doc(
        "how long the 'hang' fault holds a request (default %(default)s)")] = 30.0
    api_key: Annotated[str | None, _doc(
        "require the API key held in this environment variable", flag="--api-key-env")] = None
    embedding_dim: Annotated[Annotated[int, Meta(gt=0, le=8192)], _doc(
        "length of the vectors /v1/embeddings answers with (a request's 'dimensions' wins; default %(default)s)")] = 8

    def __post_init__(self) -> None:
        for name in _FIELDS:
            _check_value(name, getattr(self, name))
        self.faults = tuple(self.faults)
        if self.fault_rate > 0 and not self.faults:
            raise SettingError("fault_rate is set but faults is empty", None)

    def __repr__(self) -> str:
        # the API key is never shown, only whether one is set
        shown = ", ".join(f"{k}={v!r}" for k, v in public_config(self).items())
        return f"SimConfig({shown})"


class SettingError(ValueError):
    """A simulator setting that is unknown, of the wrong type or out of range; ``key`` names it."""

    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


# --- what the fields say, read once ---------------------------------------------------


class _Field(typing.NamedTuple):
    name: str
    type: Any  # the full annotation, constraints included
    loose: Any  # the same without constraints or literals: what "the wrong type" means
    meta: Meta  # the help text and flag
    bounds: Meta | None  # the range, if any
    default: Any


def _metas(tp: Any) -> list[Meta]:
    """Every Meta inside ``tp``, outermost first."""
    found: list[Meta] = []
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        found += [m for m in extras if isinstance(m, Meta)]
        found += _metas(base)
    else:
        for arg in get_args(tp):
            found += _metas(arg)
    return found


def _loose(tp: Any) -> Any:
    """``tp`` without constraints, a Literal as the type of its values."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _loose(get_args(tp)[0])
    if origin is Literal:
        return type(get_args(tp)[0])
    if origin is tuple:
        return tuple[tuple(_loose(a) if a is not Ellipsis else a for a in get_args(tp))]  # type: ignore[misc]
    args = get_args(tp)
    if args and origin in (typing.Union, types.UnionType):
        loose = [_loose(a) for a in args]
        return typing.Union[tuple(loose)]  # noqa: UP007 - built at run time
    return tp


def _read_fields() -> dict[str, _Field]:
    hints = typing.get_type_hints(SimConfig, include_extras=True)
    fields = {}
    for info in msgspec.structs.fields(SimConfig):
        tp = hints[info.name]
        metas = _metas(tp)
        bounds = next((m for m in metas if m.ge is not None or m.gt is not None or m.le is not None), None)
        doc = next(m for m in metas if m.description)
        fields[info.name] = _Field(info.name, tp, _loose(tp), doc, bounds, info.default)
    return fields


def _range_words(field: _Field) -> str:
    """How a setting's range reads in an error: "between 0 and 1", "positive", ..."""
    tp = get_args(field.type)[0]
    literals = [a for a in get_args(tp) if get_origin(a) is Literal] if get_origin(tp) is tuple else []
    if get_origin(tp) is Literal or literals:
        values = get_args(literals[0] if literals else tp)
        return ("a list of values from " if literals else "one of ") + ", ".join(repr(v) for v in values)
    b = field.bounds
    if b is None:
        return "valid"
    if b.ge is not None and b.le is not None:
        return f"between {b.ge} and {b.le}"
    if b.gt == 0:
        return "positive"
    if b.ge == 0:
        return "0 or more"
    return "in range"  # pragma: no cover - every bound above is one of these


def _check_value(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` holds it; ``SettingError`` naming it if it cannot."""
    field = _FIELDS.get(name)
    if field is None:
        raise SettingError(f"unknown simulator setting {name!r}; known: {', '.join(_FIELDS)}", name)
    try:
        msgspec.convert(value, field.loose)
    except msgspec.ValidationError:
        raise SettingError(f"simulator setting {name!r} has the wrong type ({type(value).__name__})", name) from None
    try:
        return msgspec.convert(value, field.type)
    except msgspec.ValidationError:
        raise SettingError(f"{name} must be {_range_words(field)}, not {value!r}", name) from None


# --- the admin API and the job file's [simulator] table -------------------------------------


def changed_config(config: SimConfig, changes: Mapping[str, Any]) -> SimConfig:
    """A validated copy of ``config`` with ``changes`` (JSON-shaped values accepted).

    Raises :class:`SettingError` (a ``ValueError``) naming the setting that is
    unknown, of the wrong type or out of range (``key`` None: settings that do not go together).
    """
    values = {name: _check_value(str(name), value) for name, value in changes.items()}
    return msgspec.structs.replace(config, **values)


def config_from_table(table: Mapping[str, Any]) -> SimConfig:
    """The :class:`SimConfig` of a job file's ``[simulator]`` table."""
    return changed_config(SimConfig(), table)


def table_problem(table: Mapping[str, Any]) -> tuple[str | None, str] | None:
    """The first problem of a ``[simulator]`` table as (setting or None, message), or None.

    Each setting is checked on its own first, so the one named is the one at fault.
    """
    try:
        for key, value in table.items():
            _check_value(str(key), value)
        config_from_table(table)
    except SettingError as exc:
        return exc.key, str(exc)
    return None


def public_config(config: SimConfig) -> dict[str, Any]:
    """The config as JSON; the API key is never shown, only whether one is set."""
    out: dict[str, Any] = msgspec.structs.asdict(config)
    out["api_key"] = "***" if config.api_key is not None else None
    out["faults"] = list(config.faults)
    return out


# --- the command line -----------------------------------------------------------------------


def _faults_arg(value: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in value.split(",") if kind.strip())
    try:
        return tuple(_check_value("faults", kinds))
    except SettingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(field: _Field) -> str:
    flag: str = (field.meta.extra or {}).get("flag") or "--" + field.name.replace("_", "-")
    return flag


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting (not host/port) to ``parser``; dests are ``sim_<setting>``.

    ``api_key`` is the exception: ``--api-key-env VAR`` names the variable that holds it.
    """
    group = parser.add_argument_group("simulator")
    for field in _FIELDS.values():
        dest, help = f"sim_{field.name}", field.meta.description
        base = get_args(field.loose)[0] if get_origin(field.loose) is typing.Union else field.loose
        literal = get_args(field.type)[0]
        if field.name == "api_key":
            group.add_argument(_flag(field), dest="sim_api_key_env", metavar="VAR", default=None, help=help)
        elif base is bool:
            action = "store_false" if field.default else "store_true"
            group.add_argument(_flag(field), dest=dest, action=action, default=field.default, help=help)
        elif get_origin(literal) is Literal:
            group.add_argument(_flag(field), dest=dest, choices=get_args(literal), default=field.default, help=help)
        elif get_origin(base) is tuple:
            group.add_argument(_flag(field), dest=dest, type=_faults_arg, default=field.default, help=help)
        else:
            group.add_argument(_flag(field), dest=dest, type=base, default=field.default, help=help)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The :class:`SimConfig` from arguments added by :func:`add_simulator_arguments`."""
    values = {name: getattr(args, f"sim_{name}") for name in _FIELDS if name != "api_key"}
    if args.sim_api_key_env:
        values["api_key"] = os.environ.get(args.sim_api_key_env)
        if not values["api_key"]:
            raise SettingError(f"environment variable {args.sim_api_key_env} is not set", "api_key")
    return changed_config(SimConfig(), values)


_FIELDS: dict[str, _Field] = _read_fields()
