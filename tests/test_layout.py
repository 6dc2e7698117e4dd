"""The package's shape: no import circle between its modules, no module grown past what a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pytest

import batch
from batch.errors import JobFileError
from batch.records import OUTPUT_COLUMNS
from batch.spec_load import load_job
from batch.store import output_schema

PACKAGE = Path(batch.__file__).parent
MAX_LINES = 450
# Known offenders, each work still to do (issue 12); remove a name once its module is split.
TOO_LONG = {
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports_at_load(name: str, path: Path) -> set[str]:
    """The batch modules ``name`` imports when it loads: its top-level imports, not those
    inside functions or under ``if TYPE_CHECKING:``. Importing ``a.b.c`` loads ``a.b`` too,
    except where ``a.b`` is the importer's own package (loaded already, as every parent is)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from batch import writer` imports the module batch.writer
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    with_packages = set()
    for module in found:
        parts = module.split(".")
        with_packages |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own_packages = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
    return {m for m in with_packages if m in MODULES and m not in own_packages}


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return [*trail[trail.index(node):], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*trail, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_graph_sees_the_imports_a_module_makes_when_it_loads() -> None:
    graph = {name: _imports_at_load(name, path) for name, path in MODULES.items()}
    assert {"batch.errors", "batch.records", "batch.spec"} <= graph["batch.sources.base"]
    assert "batch.store" in graph["batch.runner"]  # `from batch.store import OutputStore, ...`
    assert "batch.simulator.settings" in graph["batch.simulator.app"]  # relative or absolute alike
    assert "batch.simulator" not in graph["batch.simulator.app"]  # its own package
    assert graph["batch"] == set()  # the package face loads its modules on first use only
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package() -> None:
    graph = {name: _imports_at_load(name, path) for name, path in MODULES.items()}
    cycle = _a_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_over_the_line_limit_but_the_known_ones() -> None:
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
        for path in MODULES.values()
    }
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in TOO_LONG}
    assert too_long == {}, f"modules over {MAX_LINES} lines: split them (or, as a last resort, list them in TOO_LONG)"
    done = sorted(name for name in TOO_LONG if lengths.get(name, 0) <= MAX_LINES)
    assert done == [], f"split or gone already: remove {done} from TOO_LONG"


def test_every_output_column_is_refused_as_a_pass_through_column(tmp_path: Path) -> None:
    # the spec checks the names in batch.records; the writer writes its own typed fields: the same columns
    assert output_schema(pa.schema([pa.field("topic", pa.string())])).names == ["id", "topic", *OUTPUT_COLUMNS]
    for name in ("id", *OUTPUT_COLUMNS):
        job = tmp_path / "job.toml"
        job.write_text(
            f'[input]\npath = "in.jsonl"\npassthrough = ["{name}"]\n[output]\npath = "out.parquet"\n'
            '[api]\nbase_url = "http://127.0.0.1:8089/v1"\n[request]\nmodel = "m"\n',
            encoding="utf-8",
        )
        with pytest.raises(JobFileError, match=f"'{name}' is a column promptmill writes itself"):
            load_job(job)
