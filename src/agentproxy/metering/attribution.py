"""Label values that cannot blow up Prometheus: at most `max_values` distinct values per
label; the rest are folded into `other`, so one noisy caller costs one series.

A value takes one of the `max_values` places only when it is *admitted*: it came from a call
the upstream answered, or from the operator's own configuration (a priced model). Otherwise
100 junk model names, each refused by the upstream, would fill the places first and push
every real model into `other` for the life of the process.
"""

from __future__ import annotations

OTHER = "other"


class CardinalityGuard:
    def __init__(self, max_values: int) -> None:
        self._max = max_values
        self._seen: dict[str, set[str]] = {}

    def value(self, label: str, value: str | None, *, admit: bool = True) -> str:
        """`value` if it has a place (or, admitted, gets one), else `other`."""
        text = "" if value is None else value
        seen = self._seen.setdefault(label, set())
        if text in seen:
            return text
        if admit and len(seen) < self._max:
            seen.add(text)
            return text
        return OTHER
