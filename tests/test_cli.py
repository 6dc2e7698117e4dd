from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.cli import main
from batch.simulator import SimServer
from tests.helpers import prompts, write_jsonl


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--endpoint", "foo"], "argument --endpoint: invalid choice: 'foo'"),
        (["run", "--concurrency", "many"], "argument --concurrency: invalid int value: 'many'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert words in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("promptmill ")


def test_a_run_loads_neither_the_simulator_nor_parts_of_libraries_it_never_uses(
    tmp_path: Path, sim: SimServer
) -> None:
    # start-up time: the simulator's web server, pyarrow's cloud filesystems, httpx's own CLI
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    argv = ["run", "--input", str(inp), "--output", str(tmp_path / "out.parquet"), "--base-url", sim.base_url,
            "--model", "m", "-q"]
    script = (
        f"import sys\nfrom batch.cli import main\ncode = main({argv!r})\n"
        "unused = ('uvicorn', 'batch.simulator', 'click', 'pyarrow._s3fs', 'pyarrow._gcsfs', 'pyarrow.compute')\n"
        "print(code, sorted(name for name in unused if sys.modules.get(name) is not None))\n"
        # a rerun reads the earlier output without pyarrow's dataset layer (~0.09 s to import)
        f"code = main({argv!r})\nprint(code, 'pyarrow.dataset' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert [line for line in done.stdout.splitlines() if line.startswith("0 ")] == ["0 []", "0 False"], done.stderr
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 3


def test_the_command_exits_with_its_code_and_every_line_of_its_summary(tmp_path: Path, sim: SimServer) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    done = subprocess.run(
        [sys.executable, "-m", "batch", "run", "--input", str(inp), "--output", str(tmp_path / "out.parquet"),
         "--base-url", sim.base_url, "--model", "m"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stdout.splitlines()[-1]) == (0, f"  output    {tmp_path / 'out.parquet'}")
