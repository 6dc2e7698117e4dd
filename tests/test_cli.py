from __future__ import annotations

import pytest

from batch.cli import main


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
