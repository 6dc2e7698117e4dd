from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import batch


def test_all_is_sorted_and_every_name_exists() -> None:
    assert batch.__all__ == sorted(batch.__all__)
    for name in batch.__all__:
        assert getattr(batch, name) is not None, name


def test_every_public_module_member_is_listed() -> None:
    for name in batch.__all__:
        getattr(batch, name)  # loaded on first use
    public = {
        name for name, value in vars(batch).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("batch.")
    }
    assert public == set(batch.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    for name in ("percentile", "nothing_here"):  # the first is public in batch.summary, not in the face
        assert not hasattr(batch, name)


def test_type_checkers_see_the_same_names_from_the_same_modules() -> None:
    tree = ast.parse(Path(batch.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {
        alias.name: node.module
        for node in block.body if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert sorted(seen) == batch.__all__
    for name, module in seen.items():
        assert getattr(batch, name) is getattr(importlib.import_module(str(module)), name), name


def test_importing_the_package_or_its_errors_loads_neither_arrow_nor_the_runner() -> None:
    script = "import sys, batch, batch.errors\nprint(sorted({'batch.runner', 'pyarrow', 'httpx'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["[]"]
