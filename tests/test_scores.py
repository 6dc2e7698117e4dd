"""Scores: what a user writing [sweep.score] sees in the score_<name> columns."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pytest

from batch.errors import JobFileError
from batch.scores import PASS_FAIL_KINDS, Scorer, ScoreSpec, ScoreSpecError, last_number

HERE = __name__  # the module name pytest imported this file under


# User functions, imported by the scorer as f"{HERE}:<name>".
def length_grade(text: str, row: dict[str, Any]) -> float:
    return len(text) / len(row["answer"])


def says_yes(text: str, row: dict[str, Any]) -> bool:
    return text.startswith("yes")


def explodes(text: str, row: dict[str, Any]) -> float:
    raise RuntimeError("scorer bug")


def returns_text(text: str, row: dict[str, Any]) -> str:
    return "great"


class Grader:
    @staticmethod
    def grade(text: str, row: dict[str, Any]) -> int:
        return 3


def one(spec: ScoreSpec, text: str | None, row: dict[str, Any]) -> float | None:
    return Scorer([spec]).score(text, row)[f"score_{spec.name}"]


EXACT = ScoreSpec("em", "exact_match", reference="answer")


@pytest.mark.parametrize(
    ("text", "answer", "score"),
    [
        ("Paris", "Paris", 1.0),
        ("  paris\n", "PARIS", 1.0),
        ("New   York\tCity", "new york city", 1.0),
        ("STRASSE", "straße", 1.0),  # Unicode case-folding, not just lower()
        ("cafe\u0301", "caf\u00e9", 1.0),  # decomposed and composed é
        ("Paris.", "Paris", 0.0),
        ("Lyon", "Paris", 0.0),
    ],
)
def test_exact_match_normalises_case_and_whitespace(text: str, answer: str, score: float) -> None:
    assert one(EXACT, text, {"answer": answer}) == score


def test_exact_match_compares_a_non_text_reference_as_text() -> None:
    assert one(EXACT, " 42 ", {"answer": 42}) == 1.0


def test_contains() -> None:
    spec = ScoreSpec("has", "contains", reference="answer")
    assert one(spec, "The capital is  PARIS, of course.", {"answer": "paris"}) == 1.0
    assert one(spec, "The capital is Lyon.", {"answer": "paris"}) == 0.0


def test_regex_with_a_group_compares_the_group() -> None:
    spec = ScoreSpec("final", "regex", reference="answer", pattern=r"(?i)answer:\s*(\w+)")
    assert one(spec, "Let me think... Answer: B", {"answer": "b"}) == 1.0
    assert one(spec, "Answer: C", {"answer": "b"}) == 0.0
    assert one(spec, "I am not sure", {"answer": "b"}) == 0.0  # no match


def test_regex_without_a_group_compares_the_whole_match() -> None:
    spec = ScoreSpec("letter", "regex", reference="answer", pattern=r"\b[A-D]\b")
    assert one(spec, "the option B is right", {"answer": "b"}) == 1.0
    assert one(spec, "the option C is right", {"answer": "b"}) == 0.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The total is 1,234.5 dollars.", 1234.5),
        ("1_000_000", 1_000_000.0),
        ("from 3 to 7, so 7.", 7.0),
        ("it is -3", -3.0),
        ("pages 10-20", 20.0),  # a dash between numbers is not a sign
        ("about 2.5e3 of them", 2500.0),
        ("only .5 left", 0.5),
        ("minus \u22124", -4.0),
        ("no digits here", None),
    ],
)
def test_last_number(text: str, number: float | None) -> None:
    assert last_number(text) == number


def test_number_within_tolerance() -> None:
    exact = ScoreSpec("n", "number", reference="answer")
    assert one(exact, "So the answer is 1,234.5", {"answer": 1234.5}) == 1.0
    assert one(exact, "So the answer is 1,234.5", {"answer": "1234.50"}) == 1.0  # text reference
    assert one(exact, "1235", {"answer": 1234}) == 0.0
    assert one(exact, "I don't know", {"answer": 1234}) == 0.0
    loose = ScoreSpec("n", "number", reference="answer", tolerance=0.01)
    assert one(loose, "1.01", {"answer": 1.0}) == 1.0  # 1.01 - 1.0 rounds above 0.01 in floats
    assert one(loose, "1.02", {"answer": 1.0}) == 0.0


def test_number_reference_that_is_not_a_number_is_none_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer([ScoreSpec("n", "number", reference="answer")])
    with caplog.at_level(logging.WARNING, logger="batch.scores"):
        assert scorer.score("3", {"answer": "three"}) == {"score_n": None}
        assert scorer.score("3", {"answer": "four"}) == {"score_n": None}
    assert len(caplog.records) == 1
    assert "'three' is not a number" in caplog.records[0].getMessage()


def test_json_valid() -> None:
    spec = ScoreSpec("json", "json_valid")
    assert one(spec, ' {"a": [1, 2]} ', {}) == 1.0
    assert one(spec, "{'a': 1}", {}) == 0.0
    assert one(spec, "", {}) == 0.0


def test_failed_row_has_no_scores() -> None:
    scorer = Scorer([EXACT, ScoreSpec("json", "json_valid")])
    assert scorer.score(None, {"answer": "x"}) == {"score_em": None, "score_json": None}


def test_null_or_missing_reference_gives_none(caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer([EXACT])
    assert scorer.score("x", {"answer": None}) == {"score_em": None}
    with caplog.at_level(logging.WARNING, logger="batch.scores"):
        assert scorer.score("x", {"question": "?"}) == {"score_em": None}
        assert scorer.score("y", {"question": "?"}) == {"score_em": None}
    assert [r.getMessage() for r in caplog.records] == [
        "score 'em': the row has no column 'answer'; its score is None (said once for this score)"
    ]


def test_user_functions_return_numbers_or_bools() -> None:
    scorer = Scorer(
        [
            ScoreSpec("len", "function", function=f"{HERE}:length_grade"),
            ScoreSpec("yes", "function", function=f"{HERE}:says_yes"),
            ScoreSpec("grade", "function", function=f"{HERE}:Grader.grade"),
        ]
    )
    assert scorer.score("yes!", {"answer": "yes"}) == {"score_len": 4 / 3, "score_yes": 1.0, "score_grade": 3.0}
    assert scorer.score("no", {"answer": "yes"})["score_yes"] == 0.0


def test_user_function_that_raises_is_none_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer([ScoreSpec("boom", "function", function=f"{HERE}:explodes"), EXACT])
    with caplog.at_level(logging.WARNING, logger="batch.scores"):
        first = scorer.score("a", {"answer": "a"})
        second = scorer.score("b", {"answer": "a"})
    assert first == {"score_boom": None, "score_em": 1.0}  # the other scores still count
    assert second == {"score_boom": None, "score_em": 0.0}
    assert len(caplog.records) == 1
    assert "RuntimeError: scorer bug" in caplog.records[0].getMessage()


def test_user_function_returning_text_is_none(caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer([ScoreSpec("t", "function", function=f"{HERE}:returns_text")])
    with caplog.at_level(logging.WARNING, logger="batch.scores"):
        assert scorer.score("a", {}) == {"score_t": None}
    assert "returned 'great', not a number" in caplog.text


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "nowhere_to_be_found.scoring:score",
            "score 'q': cannot import function 'nowhere_to_be_found.scoring:score' "
            "(ModuleNotFoundError: No module named 'nowhere_to_be_found'); is its package installed or on PYTHONPATH?",
        ),
        (f"{HERE}:no_such_name", f"score 'q': cannot import function '{HERE}:no_such_name' (AttributeError: "),
        ("batch.scores", "score 'q': function 'batch.scores' is not of the form 'package.module:function'"),
        ("batch.scores:PASS_FAIL_KINDS", "score 'q': 'batch.scores:PASS_FAIL_KINDS' is a frozenset, not a function"),
    ],
)
def test_a_function_that_cannot_be_imported_fails_at_construction(function: str, message: str) -> None:
    with pytest.raises(ScoreSpecError) as caught:
        Scorer([ScoreSpec("q", "function", function=function)])
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, JobFileError) and isinstance(caught.value, ValueError)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ScoreSpec("r", "regex", reference="a", pattern="(unclosed"), "score 'r': bad regex '(unclosed': missing ), "),
        (ScoreSpec("r", "regex", reference="a"), "score 'r': 'pattern' goes with kind 'regex'"),
        (ScoreSpec("e", "exact_match"), "score 'e': kind 'exact_match' needs a 'reference' column"),
        (ScoreSpec("j", "json_valid", reference="a"), "score 'j': kind 'json_valid' takes no 'reference'"),
        (ScoreSpec("n", "number", reference="a", tolerance=-1), "score 'n': tolerance must be a number >= 0, not -1"),
        (ScoreSpec("e", "exact_match", reference="a", tolerance=1), "score 'e': 'tolerance' goes with kind 'number'"),
        (ScoreSpec("x", "fuzzy", reference="a"), "score 'x': kind 'fuzzy' is not one of exact_match, "),  # type: ignore[arg-type]
        (ScoreSpec("has space", "json_valid"), "score name 'has space' must be"),
    ],
)
def test_bad_specs_fail_at_construction(spec: ScoreSpec, message: str) -> None:
    with pytest.raises(ScoreSpecError) as caught:
        Scorer([spec])
    assert str(caught.value).startswith(message)


def test_duplicate_names_fail() -> None:
    with pytest.raises(ScoreSpecError, match="score 'em' is defined twice"):
        Scorer([EXACT, EXACT])


def test_columns_are_float64_in_spec_order() -> None:
    scorer = Scorer([EXACT, ScoreSpec("json", "json_valid"), ScoreSpec("len", "function", function=f"{HERE}:length_grade")])
    assert scorer.columns == [("score_em", pa.float64()), ("score_json", pa.float64()), ("score_len", pa.float64())]
    assert "function" not in PASS_FAIL_KINDS and "exact_match" in PASS_FAIL_KINDS
