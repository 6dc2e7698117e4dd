"""The simulator's settings: one struct drives the CLI flags, the [simulator] table and the admin API."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from batch.simulator import (
    FAULT_KINDS,
    SimConfig,
    add_simulator_arguments,
    changed_config,
    config_from_args,
    table_problem,
)
from tests.helpers import prompts, run_cli, write_jsonl

# a value other than the default for every setting, and how its flag says it
CHANGED: dict[str, tuple[Any, list[str]]] = {
    "latency_ms": (200.0, ["--latency-ms", "200"]),
    "ttft_ms": (15.0, ["--ttft-ms", "15"]),
    "rpm": (60, ["--rpm", "60"]),
    "tpm": (9000, ["--tpm", "9000"]),
    "window_s": (5.0, ["--window-s", "5"]),
    "limit_style": ("atoma", ["--limit-style", "atoma"]),
    "fault_rate": (0.1, ["--fault-rate", "0.1"]),
    "faults": (("500", "hang"), ["--faults", "500,hang"]),
    "seed": (7, ["--fault-seed", "7"]),
    "invalid_output_rate": (0.25, ["--invalid-output-rate", "0.25"]),
    "fatal_status": (401, ["--fatal-status", "401"]),
    "fatal_after": (3, ["--fatal-after", "3"]),
    "context_tokens": (4096, ["--context-tokens", "4096"]),
    "stream_done": (False, ["--no-done"]),
    "usage_every_chunk": (True, ["--usage-every-chunk"]),
    "keepalive": (True, ["--keepalive"]),
    "hang_s": (2.5, ["--hang-s", "2.5"]),
    "api_key": ("sk-from-env", ["--api-key-env", "SIM_KEY"]),
    "embedding_dim": (32, ["--embedding-dim", "32"]),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_simulator_arguments(p)
    return p


def test_every_setting_has_a_flag_with_its_help() -> None:
    names = [f.name for f in msgspec.structs.fields(SimConfig)]
    assert sorted(CHANGED) == sorted(names)  # a new setting needs a line above
    helps = {action.dest: action.help for action in parser()._actions}
    for name in names:
        dest = "sim_api_key_env" if name == "api_key" else f"sim_{name}"
        assert helps.get(dest), f"no flag with help for {name}"


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_flag_sets_its_setting(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_KEY", "sk-from-env")
    value, argv = CHANGED[name]
    assert getattr(SimConfig(), name) != value
    config = config_from_args(parser().parse_args(argv))
    assert config == msgspec.structs.replace(SimConfig(), **{name: value})


def test_no_flags_is_the_default_config_and_bad_flag_values_are_refused() -> None:
    assert config_from_args(parser().parse_args([])) == SimConfig()
    with pytest.raises(SystemExit):
        parser().parse_args(["--faults", "meteor"])
    with pytest.raises(ValueError, match="SIM_UNSET"):
        config_from_args(parser().parse_args(["--api-key-env", "SIM_UNSET"]))
    assert set(FAULT_KINDS) == {"500", "502", "503", "reset", "hang", "malformed", "cut"}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_setting_in_a_table_is_checked_by_its_own_type(name: str) -> None:
    value = CHANGED[name][0]
    assert table_problem({name: list(value) if isinstance(value, tuple) else value}) is None
    wrong = 3 if isinstance(value, str | tuple) else "three"
    key, message = table_problem({name: wrong}) or (None, "")
    assert key == name and name in message and "wrong type" in message


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"fault_rate": 2}, "fault_rate", "fault_rate must be between 0 and 1, not 2"),
        ({"rpm": 0}, "rpm", "rpm must be positive, not 0"),
        ({"latency_ms": -1}, "latency_ms", "latency_ms must be 0 or more, not -1"),
        ({"fatal_status": 200}, "fatal_status", "fatal_status must be between 400 and 599"),
        ({"limit_style": "azure"}, "limit_style", "one of 'openai', 'atoma'"),
        ({"faults": ["meteor"]}, "faults", "'hang'"),
        ({"latency": 5}, "latency", "unknown simulator setting 'latency'"),
        ({"fault_rate": 0.5, "faults": []}, None, "fault_rate is set but faults is empty"),
    ],
)
def test_a_bad_table_names_the_setting(table: dict[str, Any], key: str | None, words: str) -> None:
    problem = table_problem(table)
    assert problem is not None and problem[0] == key and words in problem[1]
    with pytest.raises(ValueError, match=words.split(",")[0]):
        changed_config(SimConfig(), table)
    with pytest.raises((ValueError, TypeError)):  # built directly, the same checks hold (an unknown name: TypeError)
        SimConfig(**table)


def test_the_api_key_is_never_in_its_repr() -> None:
    assert "sk-secret" not in repr(SimConfig(api_key="sk-secret"))


def test_a_bad_simulator_table_in_a_job_is_one_line_with_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{tmp_path / "in.jsonl"}"\n[output]\npath = "{tmp_path / "o.parquet"}"\n'
                   '[api]\nbase_url = "simulator"\n[request]\nmodel = "m"\n[simulator]\nlatency_ms = 1\nfault_rate = 2\n')
    run = run_cli(capsys, "run", job, "--no-progress")
    assert run.code == 2
    assert run.err.splitlines() == [
        f"promptmill: {job}, line 11, key 'simulator.fault_rate': fault_rate must be between 0 and 1, not 2"
    ]
    assert not (tmp_path / "o.parquet").exists()


def test_simulate_with_flags_that_do_not_go_together_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run = run_cli(capsys, "simulate", "--fault-rate", "0.5", "--faults", "")
    assert (run.code, run.err.splitlines()) == (2, ["promptmill: fault_rate is set but faults is empty"])


def test_neither_the_spec_nor_the_runner_imports_the_simulator() -> None:
    script = "import sys, batch.spec, batch.spec_load, batch.runner, batch.cli\nprint(sorted(m for m in sys.modules if 'simulator' in m or m == 'uvicorn'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


async def test_the_runner_asks_for_a_started_simulator(tmp_path: Path) -> None:
    from batch.errors import UsageError
    from batch.runner import RunOptions, run_job
    from batch.spec_load import load_job

    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    spec = load_job(None, {"input.path": str(tmp_path / "in.jsonl"), "output.path": str(tmp_path / "o.parquet"),
                           "api.base_url": "simulator", "request.model": "m"})
    with pytest.raises(UsageError, match="RunOptions"):
        await run_job(spec, RunOptions(handle_signals=False, progress=False))
    assert list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]  # nothing written


def test_the_simulator_package_face_lists_every_export_sorted() -> None:
    import batch.simulator as simulator

    assert simulator.__all__ == sorted(simulator.__all__)
    public = {name for name, value in vars(simulator).items()
              if not name.startswith("_") and getattr(value, "__module__", "").startswith("batch.simulator")}
    assert public == set(simulator.__all__) - {"FAULT_KINDS"}  # a tuple has no __module__
    assert all(getattr(simulator, name) is not None for name in simulator.__all__)
