"""Checks on an output before anything is sent: not the input, ours to replace, in a writable folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import OutputError
from batch.store.schema import METADATA_KEY

__all__ = ["check_not_input", "check_output_ours", "check_output_writable", "is_promptmill_output", "output_target"]


def check_not_input(output: Path, inp: Path) -> None:
    """Refuse an output that is the input file, after links and in any spelling, whatever the flags."""
    same = os.path.realpath(output) == os.path.realpath(inp)
    if not same:
        with contextlib.suppress(OSError):
            same = output.exists() and os.path.samefile(output, inp)
    if same:
        raise OutputError(
            f"the output is the input file {inp}: promptmill never writes its input; choose another output",
            path=output,
        )


def output_target(output: Path) -> Path:
    """Where the output's bytes go: through a symbolic link to its target, never replacing the link."""
    return Path(os.path.realpath(output)) if output.is_symlink() else output


def is_promptmill_output(output: Path) -> bool:
    """Whether the file at ``output`` is a Parquet file carrying promptmill's metadata."""
    try:
        meta = pq.read_schema(output).metadata or {}
    except (OSError, pa.ArrowException, ValueError):
        return False
    return METADATA_KEY in meta


def check_output_ours(output: Path) -> None:
    """Refuse to read, replace or mix with an existing file promptmill did not write (``--fresh`` included)."""
    if output.is_file() and not is_promptmill_output(output):
        raise OutputError(
            "a file that promptmill did not write is in the way (no promptmill metadata); it is never "
            "replaced, not even with --fresh: move it away or choose another output",
            path=output,
        )


def check_output_writable(output: Path) -> None:
    """Create the output's folder and prove it is writable, before any request is sent."""
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=folder) from None
    if output.is_dir():
        raise OutputError("the output path is a folder; give a file name ending in .parquet", path=output)
    probe = folder / f".promptmill-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"the output folder is not writable: {exc.strerror}", path=folder) from None
