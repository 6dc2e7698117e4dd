"""The variant contract: a plain job is one variant; a [sweep] expands into named variants; mistakes are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.errors import JobFileError
from batch.spec_load import load_job
from batch.variants import sample_seed

BASE = """
[input]
path = "in.jsonl"
[output]
path = "out.parquet"
[api]
base_url = "http://127.0.0.1:8089/v1"
[request]
model = "org/base"
max_tokens = 64
temperature = 0.2
[limits]
concurrency = 8
rpm = 120
"""


def _job(tmp_path: Path, sweep: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(BASE + sweep, encoding="utf-8")
    return path


def test_a_plain_job_is_one_variant_named_after_its_model(tmp_path: Path) -> None:
    spec = load_job(_job(tmp_path, ""))
    (v,) = spec.variants()
    assert (v.name, v.model, v.params) == ("org/base", "org/base", {"max_tokens": 64, "temperature": 0.2})
    assert (v.target.base_url, v.target.rpm, v.target.concurrency, v.target.name) == (
        "http://127.0.0.1:8089/v1", 120, 8, "127.0.0.1:8089")
    assert spec.samples == 1 and not spec.is_sweep and spec.baseline() == "org/base"


def test_a_grid_and_listed_variants_expand_in_order_with_readable_names(tmp_path: Path) -> None:
    spec = load_job(_job(tmp_path, """
[sweep]
samples = 3
[sweep.grid]
model = ["org/a", "b"]
temperature = [0.0, 0.7]
[[sweep.variant]]
name = "remote"
base_url = "http://127.0.0.1:9000/v1/"
rpm = 30
concurrency = 2
system_prompt = "Be terse."
top_k = 5
[[sweep.variant]]
seed = 7
"""))
    names = [v.name for v in spec.variants()]
    assert names == ["model=a,temperature=0.0", "model=a,temperature=0.7", "model=b,temperature=0.0",
                     "model=b,temperature=0.7", "remote", "seed=7"]
    by = {v.name: v for v in spec.variants()}
    assert by["model=a,temperature=0.7"].model == "org/a"
    assert by["model=a,temperature=0.7"].params == {"max_tokens": 64, "temperature": 0.7}
    remote = by["remote"]
    assert remote.params == {"max_tokens": 64, "temperature": 0.2, "top_k": 5}
    assert remote.system_prompt == "Be terse."
    assert (remote.target.base_url, remote.target.rpm, remote.target.concurrency) == ("http://127.0.0.1:9000/v1", 30, 2)
    # the job's target is one lane for the others: they share what is left of the concurrency
    assert {by[n].target for n in names if n != "remote"} == {by["seed=7"].target}
    assert by["seed=7"].target.concurrency == 8
    assert spec.samples == 3 and spec.baseline() == "model=a,temperature=0.0"


@pytest.mark.parametrize(("sweep", "where", "message"), [
    ("[sweep.grid]\ntemprature = [0.1]\n", "line 16, key 'sweep.grid.temprature'", "did you mean 'temperature'"),
    ("[sweep.grid]\ntemperature = []\n", "key 'sweep.grid.temperature'", "empty list"),
    ("[[sweep.variant]]\nname = \"x\"\nflush_rows = 3\n", "line 17, key 'sweep.variant[0].flush_rows'", "unknown key"),
    ("[[sweep.variant]]\nname = \"x\"\n[[sweep.variant]]\nname = \"x\"\n", "line 18, key 'sweep.variant[1].name'",
     "'x' is used twice"),
    ("[sweep]\nbaseline = \"y\"\n[[sweep.variant]]\nname = \"x\"\n", "line 16, key 'sweep.baseline'",
     "'y' is not a variant; the variants are: x"),
    ("[[sweep.variant]]\ntemperature = \"hot\"\n", "key 'sweep.variant[0].temperature'", "'hot'"),
    ("[[sweep.variant]]\nendpoint = \"edits\"\n", "key 'sweep.variant[0].endpoint'", "edits"),
])
def test_a_mistake_in_the_sweep_is_one_line_with_its_place(tmp_path: Path, sweep: str, where: str,
                                                          message: str) -> None:
    with pytest.raises(JobFileError) as caught:
        load_job(_job(tmp_path, sweep))
    text = str(caught.value)
    assert where in text and message in text and "\n" not in text


def test_a_key_in_a_variant_is_refused_like_one_anywhere_else(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="must not hold an API key"):
        load_job(_job(tmp_path, '[[sweep.variant]]\napi_key = "abc"\n'))


def test_the_sample_seed_is_stable_and_differs_per_sample() -> None:
    assert sample_seed("r1", 0) == sample_seed("r1", 0)
    assert len({sample_seed("r1", s) for s in range(5)} | {sample_seed("r2", 0)}) == 6
    assert 0 <= sample_seed("r1", 3) < 2**31
