"""From one input row to its requests: one per (variant, sample), interleaved row by row.

A plain job has one variant and one sample: a row is one request, built as it
always was (no seed added, the id as the resume key). In a sweep every request
carries its variant's name, its sample number and its lane (the target whose
workers send it); a sample whose variant sets no ``seed`` sends
:func:`batch.variants.sample_seed` of the row id and sample number, so a rerun
asks the same. The resume key is (id, variant, sample).

With ``sample_mode = "n"`` a (row, variant) is one request with ``n = samples``
(and the seed of sample 0), keyed by sample 0: its answer's choices become the
rows of samples 0 .. n-1, recorded together (:func:`batch.choices.per_choice`),
so sample 0 done with the same body means every sample is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
        # sample_mode = "n": one request a (row, variant) answers every sample
        self.choices = self.samples if self.sweep and spec.sweep is not None and spec.sweep.sample_mode == "n" else 1
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
        for _, request in self.each(row, done):
            if request is None:
                skipped += self.choices  # a request asked with n: its every sample was done
            else:
                out.append(request)
        return out, skipped

    def resume_key(self, row_id: str, variant: str, sample: int) -> str:
        """What the resume index knows a request by (with its fingerprint): the id, or (id, variant, sample)."""
        return sweep_key(row_id, variant, sample) if self.sweep else row_id

    def each(self, row: Row, done: Done | None) -> Iterator[tuple[Variant, Request | None]]:
        """Every request of ``row`` in sending order, with its variant, or None when an earlier run
        finished it (``promptmill plan`` counts both, per variant). With ``sample_mode = "n"`` one
        request a (row, variant), sample 0's, asks ``n`` = samples choices (its ``choices``)."""
        for sample in range(self.samples // self.choices):
            for variant, lane, builder, seeded, _ in self._arms:
                extra: Mapping[str, Any] | None = None
                key = self.resume_key(row.id, variant.name, sample)
                if self.sweep and not seeded:
                    extra = {"seed": sample_seed(row.id, sample)}
                if self.choices > 1:
                    extra = {**(extra or {}), "n": self.choices}
                request = builder.build_unless_done(row, done or _NOTHING, key, extra)
                if request is None:
                    yield variant, None
                else:
                    yield variant, msgspec.structs.replace(request, variant=variant.name, sample=sample, lane=lane,
                                                           choices=self.choices)


class _Nothing:
    def __contains__(self, key: tuple[str, str], /) -> bool:
        return False


_NOTHING = _Nothing()
