"""From one input row to its requests: one per (variant, sample), interleaved row by row.

A plain job has one variant and one sample: a row is one request, built as it
always was (no seed added, the id as the resume key). In a sweep every request
carries its variant's name, its sample number and its lane (the target whose
workers send it); a sample whose variant sets no ``seed`` sends
:func:`batch.variants.sample_seed` of the row id and sample number, so a rerun
asks the same. The resume key is (id, variant, sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import orjson

from batch.prompts import Done, RequestBuilder, output_format
from batch.records import Request, Row
from batch.spec import JobSpec
from batch.store import sweep_key
from batch.structured import OutputFormat
from batch.variants import Target, Variant, sample_seed

__all__ = ["Fanout"]


class Fanout:
    """Builds every request of a row, for every variant and sample, in a fixed order."""

    def __init__(self, spec: JobSpec, variants: tuple[Variant, ...] | None = None,
                 fmt: OutputFormat | None = None) -> None:
        self.spec = spec
        #: structured output: one schema for every variant, sent its endpoint's way (None: plain text)
        self.format = fmt if fmt is not None else output_format(spec)
        self.variants = variants if variants is not None else spec.variants()
        self.sweep = spec.is_sweep
        self.samples = spec.samples
        self.targets: list[Target] = list(dict.fromkeys(v.target for v in self.variants))
        lane_of = {t: i for i, t in enumerate(self.targets)}
        self._arms = [(v, lane_of[v.target], RequestBuilder(spec, v, self.format), "seed" in v.params,
                       orjson.dumps(v.params_doc()).decode()) for v in self.variants]
        self.params_json = {v.name: arm[4] for v, arm in zip(self.variants, self._arms, strict=True)}
        self.model_of = {v.name: v.model for v in self.variants}
        self.endpoint_of = {v.name: v.target.endpoint for v in self.variants}

    @property
    def per_row(self) -> int:
        """Requests one row makes at most."""
        return len(self.variants) * self.samples

    def requests(self, row: Row, done: Done | None) -> tuple[list[Request], int]:
        """The requests ``row`` still needs, and how many an earlier run finished."""
        out: list[Request] = []
        skipped = 0
        for sample in range(self.samples):
            for variant, lane, builder, seeded, _ in self._arms:
                extra: Mapping[str, Any] | None = None
                key = row.id
                if self.sweep:
                    key = sweep_key(row.id, variant.name, sample)
                    if not seeded:
                        extra = {"seed": sample_seed(row.id, sample)}
                if done:
                    request = builder.build_unless_done(row, done, key, extra)
                else:
                    request = builder.build_unless_done(row, _NOTHING, key, extra)
                if request is None:
                    skipped += 1
                    continue
                out.append(msgspec.structs.replace(request, variant=variant.name, sample=sample, lane=lane))
        return out, skipped


class _Nothing:
    def __contains__(self, key: tuple[str, str], /) -> bool:
        return False


_NOTHING = _Nothing()
