"""The meter: after a call, what it cost and for whom, into the metrics.

A call's cost is its rule's `cost` (fixed or a CEL expression over the call) plus, for LLM
calls, its tokens at the price table. Every label that a caller can influence (agent, model,
attribution values) goes through a cardinality guard.
"""

from __future__ import annotations

import logging
from typing import Any

from cel_expr_python import cel

from agentproxy.config.model import MeteringSettings
from agentproxy.core import Principal, principal_view
from agentproxy.metering.attribution import CardinalityGuard
from agentproxy.metering.metrics import Metrics
from agentproxy.metering.prices import PriceTable, TokenUsage

log = logging.getLogger("agentproxy.meter")

_ENV = cel.NewEnv(variables={"principal": cel.Type.Map(cel.Type.STRING, cel.Type.DYN)})


class Meter:
    def __init__(self, settings: MeteringSettings, metrics: Metrics) -> None:
        """Raises ValueError naming an attribution label whose CEL does not compile."""
        self.settings = settings
        self.metrics = metrics
        self.prices = PriceTable(settings.prices, settings.default_max_output_tokens)
        self.guard = CardinalityGuard(settings.max_values)
        self._labels = compile_attribution(settings)

    def token_cost(self, model: str | None, usage: TokenUsage) -> float | None:
        """The tokens' price, or None (and a metric) for a model the table does not cover."""
        cost = self.prices.cost(model or "", usage)
        if cost is None:
            total = usage.input + usage.output + usage.cached_input
            # Tokens are read from an answer: the upstream answered for this model.
            self.metrics.unpriced_tokens.labels(self.guard.value("model", model)).inc(total)
        return cost

    def record(
        self,
        *,
        principal: Principal,
        upstream: str,
        action: str,
        model: str | None,
        cost: float | None,
        currency: str,
        usage: TokenUsage | None,
        answered: bool = True,
    ) -> None:
        """`answered`: the upstream answered the call (not an error status, not a refusal).
        The model is the agent's to write, so a new model name takes a place in the
        cardinality guard only then, or when the price table (the operator's) names it;
        agent and attribution values come from verified tokens."""
        guard = self.guard
        priced = model is not None and self.prices.price(model) is not None
        labels = [
            guard.value("agent", principal.agent),
            upstream,
            action,
            guard.value("model", model, admit=answered or priced),
            *self._attribution(principal),
        ]
        m = self.metrics
        m.calls.labels(*labels).inc()
        if cost:
            m.cost.labels(currency, *labels).inc(cost)
        if usage is not None:
            for kind, count in (
                ("input", usage.input),
                ("output", usage.output),
                ("cached_input", usage.cached_input),
            ):
                if count:
                    m.tokens.labels(kind, *labels).inc(count)

    def _attribution(self, principal: Principal) -> list[str]:
        if not self._labels:
            return []
        data = {"principal": principal_view(principal)}
        out = []
        for name, expr in self._labels:
            try:
                result = expr.eval(data=data)
            except Exception:  # cel-cpp refuses a value: no label value, not a failed call
                out.append(self.guard.value(name, None))
                continue
            # An evaluation error (an absent claim) is no value, not the error's text.
            value: Any = None if result.type() == cel.Type.ERROR else result.value()
            text = None if value is None else value if isinstance(value, str) else str(value)
            out.append(self.guard.value(name, text))
        return out


def compile_attribution(settings: MeteringSettings) -> list[tuple[str, cel.Expression]]:
    """Raises ValueError naming the label whose CEL does not compile."""
    out = []
    for name, source in settings.attribution:
        try:
            out.append((name, _ENV.compile(source)))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "does not compile"
            raise ValueError(f"metering.attribution.labels.{name}: CEL {first}") from None
    return out
