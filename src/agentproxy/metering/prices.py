"""Tokens into money: the price table, model globs matched in the order written."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from agentproxy.config.model import Price

MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """`input` is billed at the input price, `cached_input` at the cached price."""

    input: int = 0
    output: int = 0
    cached_input: int = 0


class PriceTable:
    def __init__(self, prices: tuple[tuple[str, Price], ...]) -> None:
        self._prices = prices

    def price(self, model: str) -> Price | None:
        for pattern, price in self._prices:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def cost(self, model: str, usage: TokenUsage) -> float | None:
        """The money `usage` of `model` costs; None when no price matches the model."""
        price = self.price(model)
        if price is None:
            return None
        cached = (
            price.input_per_mtok
            if price.cached_input_per_mtok is None
            else price.cached_input_per_mtok
        )
        return (
            usage.input * price.input_per_mtok
            + usage.cached_input * cached
            + usage.output * price.output_per_mtok
        ) / MTOK
