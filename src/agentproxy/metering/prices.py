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
    def __init__(
        self, prices: tuple[tuple[str, Price], ...], default_max_output_tokens: int = 4096
    ) -> None:
        self._prices = prices
        self._default_output = default_max_output_tokens

    def output_reserve(self, model: str, asked: int | None) -> int:
        """The output tokens to reserve for a call: what it asks for, or, when it names no
        max_tokens, the model's output cap (its price's `max_output_tokens`, else the
        configured default). Reserving nothing let 20 concurrent calls spend ten times a
        budget before the first answer settled."""
        if asked is not None:
            return asked
        price = self.price(model)
        if price is not None and price.max_output_tokens is not None:
            return price.max_output_tokens
        return self._default_output

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
