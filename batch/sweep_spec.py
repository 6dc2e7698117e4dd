"""The ``[sweep]`` table of a job file, as written (``batch.variants`` expands it into variants).

::

    [sweep]
    samples = 3                 # each (row, variant) is asked 3 times (default 1)
    sample_mode = "separate"    # or "n": one request with n = samples, one output row per choice
    baseline = "llama-t0"       # the variant the others are compared with (default: the first)

    [sweep.grid]                # the cartesian product of the lists: 2 x 2 = 4 variants
    model = ["a", "b"]
    temperature = [0.0, 0.7]

    [[sweep.variant]]           # named variants; any request parameter, the prompt, the target
    name = "llama-t0"
    model = "a"
    system_prompt = "Answer with one word."

    [[sweep.score]]             # scores need no grid or variant: a job may have only these
    name = "correct"
    kind = "number"
    reference = "answer"

Kept apart from ``batch.spec`` (which holds the job's other sections) so that
``batch.variants`` can read both without an import circle.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from batch.scores import ScoreSpec

__all__ = ["SweepSpec"]


class SweepSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[sweep]``: the grid and the listed variants stay raw tables; ``batch.variants`` checks them."""

    samples: Annotated[int, msgspec.Meta(gt=0, le=1000)] = 1
    sample_mode: Literal["separate", "n"] = "separate"
    baseline: str | None = None
    grid: dict[str, list[Any]] = msgspec.field(default_factory=dict)
    variant: tuple[dict[str, Any], ...] = ()
    score: tuple[ScoreSpec, ...] = ()

    @property
    def varies(self) -> bool:
        """Whether the sweep defines variants (a ``[sweep]`` with only scores does not)."""
        return bool(self.grid or self.variant)
