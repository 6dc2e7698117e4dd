"""What a job writes, for either engine: its output's identity, schema and metadata, and the end
(the output assembled, each variant's numbers, the OpenAI batch files, the summary)."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
import pyarrow as pa

from batch import __version__, variant_summary
from batch.errors import DiskError
from batch.prompts import output_format
from batch.spec import JobSpec, template_fields
from batch.store import (
    METADATA_KEY,
    OutputStore,
    check_not_input,
    check_output_writable,
    output_schema,
)
from batch.store.batch_output import write_batch_output
from batch.store.schema import EXTRA_FIELDS

if TYPE_CHECKING:
    from batch.sources import Source
    from batch.structured import OutputFormat
    from batch.summary import Summary

__all__ = ["batch_files", "checked_output", "finish_output", "job_identity", "job_schema", "with_columns_read"]

log = logging.getLogger(__name__)


def job_identity(spec: JobSpec) -> dict[str, Any]:
    """What makes two runs the same job for one output: its name and its input.

    The model, template and request parameters are not part of it: changing
    them is still the same job, and the rows whose requests changed are redone.
    """
    return {
        "job": spec.name,
        "input": str(Path(spec.input.path).resolve()),
        "id_column": spec.input.id_name,
    }


def metadata(spec: JobSpec, identity: dict[str, Any]) -> dict[bytes, bytes]:
    # the settings of the job, for audit; the key variable's name is in them, never its value
    settings = spec.settings()
    if isinstance(settings.get("simulator"), dict) and settings["simulator"].get("api_key") is not None:
        # the key a built-in simulator expects is the job's real key too, as often as not
        settings["simulator"]["api_key"] = "***"
    doc = {"identity": identity, "settings": settings, "promptmill": __version__,
           "variants": [v.described() for v in spec.variants()], "baseline": spec.baseline(),
           "samples": spec.samples}
    return {METADATA_KEY: orjson.dumps(doc, default=str)}


def batch_files(spec: JobSpec, day: date | None) -> list[Path]:
    """The OpenAI batch output file and error file the job writes at the end (none for Parquet)."""
    if spec.output.format != "openai_batch":
        return []
    errors = spec.error_path(day)
    return [spec.output_path(day), *([errors] if errors is not None else [])]


def _extra_columns(spec: JobSpec, reader: Source) -> tuple[pa.Field, ...]:
    """The result columns only some jobs write (see ``batch.store.schema.EXTRA_FIELDS``)."""
    extra: list[str] = []
    if any(v.target.endpoint == "embeddings" for v in spec.variants()) or getattr(reader, "format", None) == "openai_batch":
        extra.append("embedding")
    if spec.output.format == "openai_batch":
        extra += ["response_body", "request_id"]
    return tuple(EXTRA_FIELDS[name] for name in extra)


def with_columns_read(spec: JobSpec) -> JobSpec:
    """The job with the columns its scores and variants' templates read added to the pass-through
    columns, so each row carries them (and the output keeps the references a judge job reads)."""
    wanted = [s.reference for s in spec.scores if s.reference is not None]
    for v in spec.variants():
        if v.prompt_template is not None and v.prompt_template != spec.input.prompt_template:
            wanted += template_fields(v.prompt_template)
    added = [c for c in dict.fromkeys(wanted) if c not in spec.input.passthrough and c != spec.input.id_name]
    if not added:
        return spec
    return msgspec.structs.replace(
        spec, input=msgspec.structs.replace(spec.input, passthrough=(*spec.input.passthrough, *added)))


def checked_output(spec: JobSpec, day: date | None) -> Path:
    """The Parquet output (the durable store; beside an OpenAI batch output file), once it and
    the batch files are checked: none is the input, each can be written."""
    output = spec.store_path(spec.output_path(day))
    OutputStore.check(output, Path(spec.input.path))
    for export in batch_files(spec, day):
        check_not_input(export, Path(spec.input.path))
        check_output_writable(export)
    return output


def job_schema(spec: JobSpec, reader: Source, identity: dict[str, Any]) -> tuple[pa.Schema, OutputFormat | None]:
    """The output's schema (the input's pass-through columns, the scores, the result columns, the
    structured output's fields; the job's settings in its metadata), and the structured output's format."""
    fmt = output_format(spec)  # structured output: the schema every variant's answers are checked by
    scores = pa.schema([pa.field(f"score_{s.name}", pa.float64()) for s in spec.scores])
    schema = output_schema(pa.schema([*reader.passthrough_schema, *scores]), metadata(spec, identity),
                           [*_extra_columns(spec, reader), *(fmt.fields if fmt else ())])
    return schema, fmt


def finish_output(spec: JobSpec, day: date | None, store: OutputStore, summary: Summary,
                  failed: DiskError | None = None) -> None:
    """Assemble the output, each variant's numbers and the batch files, then write the summary.

    ``failed``: a disk error met already (the last flush): nothing more is assembled. A disk
    error in any step stops the rest of what needs the disk (never the parts on it) and is raised last.
    """
    if failed is None:
        try:
            store.assemble()
            if spec.is_sweep or spec.scores:
                summary.variant_report, summary.variant_lines = variant_summary.section(store.path)
            files = batch_files(spec, day)
            if files:
                ok, bad = write_batch_output(store.path, *files)
                log.info("batch output: %s lines in %s%s", f"{ok + bad if len(files) == 1 else ok:,}", files[0],
                         f", {bad:,} failed lines in {files[1]}" if len(files) > 1 else "")
                summary.batch_files = [str(f) for f in files]
        except DiskError as exc:
            failed = exc
    if failed is not None:
        summary.stopped = str(failed)
    try:
        store.write_summary(summary)
    except DiskError as exc:
        failed = failed or exc
    if failed is not None:
        if not summary.stopped:
            summary.stopped = str(failed)
        log.debug("rows not on disk: %d", store.rows_not_on_disk)
        raise failed
