"""Cost of a row: USD per million tokens, per model.

Prices come from the job's ``[pricing]`` table, over the example table shipped
in ``batch/prices.toml`` (clearly labelled examples: the Atoma network publishes
no per-model prices, and nothing is fetched at run time). Cached prompt tokens
are charged at ``cached_input`` (default: the input price); reasoning tokens are
part of the completion tokens and charged as output.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from batch.records import Usage

__all__ = ["Price", "PriceTable", "default_prices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None


def default_prices() -> dict[str, Price]:
    """The example prices shipped with the package."""
    raw = tomllib.loads(resources.files("batch").joinpath("prices.toml").read_text())
    return {model: Price(**fields) for model, fields in raw.items()}


class PriceTable:
    """Looks up a model's price and turns usage into dollars."""

    def __init__(self, prices: Mapping[str, Price] | None = None, *, use_defaults: bool = True) -> None:
        self._prices: dict[str, Price] = default_prices() if use_defaults else {}
        self._prices.update(prices or {})
        self._warned: set[str] = set()

    def __contains__(self, model: str) -> bool:
        return model in self._prices

    def get(self, model: str) -> Price | None:
        """The model's price, or None when it has none."""
        return self._prices.get(model)

    def cost(self, model: str, usage: Usage | None) -> float | None:
        """Dollars for one answer; None when the model has no price (warned once) or no usage came."""
        if usage is None:
            return None
        price = self._prices.get(model)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r: cost_usd is left empty; add [pricing.%r] to the job file", model, model)
            return None
        cached = usage.cached_tokens or 0
        cached_price = price.input if price.cached_input is None else price.cached_input
        return (
            (usage.prompt_tokens - cached) * price.input
            + cached * cached_price
            + usage.completion_tokens * price.output
        ) / 1_000_000
